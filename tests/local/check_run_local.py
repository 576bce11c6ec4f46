"""`deepseek-operator run-local` on the two-pool sample, driven by real clients.

Runs `run-local --watch` on a copy of deploy/samples/tiny-ep.yaml (two pools of two-rank
expert-parallel groups: pool a two pods of one rank, pool b one pod of two ranks), then:

1. the official OpenAI client and a gRPC client (stubs generated from the .proto) are served
   through the printed URLs;
2. under a load of streamed requests, one worker process is killed (SIGKILL): no request
   whose response had not begun fails (the router retries it on another group), the process comes back, its group re-forms and
   the restarted rank serves;
3. the file is edited (worker.maxBatchTokens): every group is replaced, one pool at a time,
   with no failed request at all; then pool a is scaled to two groups and back, again with
   no failed request;
4. SIGINT: run-local exits 0 and leaves no process behind;
5. the autoscaling sample with a second, lighter pool: at zero, the first request wakes a
   group and is answered; 10 streams grow the heavier pool, 20 spill to the other; idle,
   the spill-over group goes first, then the rest, down to zero;
6. a last run, killed with SIGKILL: its processes die with it.

  python tests/local/check_run_local.py --bin-dir target/debug
"""

import argparse
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import openai

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import grpc_stubs  # noqa: E402
MODEL = "tiny-deepseek"


def check(condition, what):
    if not condition:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}", flush=True)


class RunLocal:
    """run-local as a child process; its stdout lines kept and searchable in order."""

    def __init__(self, bin_dir, manifest, *flags):
        self.proc = subprocess.Popen(
            [bin_dir / "deepseek-operator", "run-local", *flags, "-f", manifest],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines, self.seen = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.cursor = 0

    def _read(self):
        for line in self.proc.stdout:
            self.seen.put(line.rstrip("\n"))
        self.seen.put(None)

    def wait_for(self, pattern, timeout=120):
        """The first line after the cursor matching `pattern`; the cursor moves past it."""
        deadline = time.time() + timeout
        while True:
            while self.cursor < len(self.lines):
                line = self.lines[self.cursor]
                self.cursor += 1
                match = re.search(pattern, line)
                if match:
                    return match
            try:
                line = self.seen.get(timeout=max(0.0, deadline - time.time()))
            except queue.Empty:
                raise SystemExit(f"FAILED: no line matching {pattern!r} within {timeout}s")
            if line is None:
                raise SystemExit(f"FAILED: run-local exited before {pattern!r}")
            print(f"  run-local: {line}", flush=True)
            self.lines.append(line)

    def pids(self):
        return [int(m.group(1)) for line in self.lines for m in [re.search(r"started \(pid (\d+)", line)] if m]


def alive(pid):
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def generate(pb, pb_grpc, addr, text, max_new_tokens=4):
    with grpc.insecure_channel(addr) as channel:
        stub = pb_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(text=text, stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens))
        return list(stub.Generate(request, timeout=60))


class Load:
    """Streamed chat completions from a few threads; each outcome is (started, error):
    whether the router had begun the response (HTTP 200) before any error."""

    def __init__(self, client, threads=3):
        self.client, self.outcomes, self.running = client, [], True
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _loop(self, i):
        n = 0
        while self.running:
            n += 1
            started, error = False, None
            try:
                stream = self.client.chat.completions.create(
                    model=MODEL, stream=True, max_tokens=24, temperature=0,
                    messages=[{"role": "user", "content": f"request {i}-{n}"}])
                # The router answered 200: the response has started (tokens may follow).
                started = True
                for _ in stream:
                    pass
            except openai.APIError as e:
                error = f"{type(e).__name__}: {e}"
            with self.lock:
                self.outcomes.append((started, error))

    def take(self):
        with self.lock:
            outcomes, self.outcomes = self.outcomes, []
        return outcomes

    def stop(self):
        self.running = False
        for t in self.threads:
            t.join()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", default=str(ROOT / "target/debug"))
    bin_dir = pathlib.Path(parser.parse_args().bin_dir).resolve()
    work = pathlib.Path(tempfile.mkdtemp(prefix="run-local-check-"))
    pb, pb_grpc = grpc_stubs.generate(work)
    manifest = work / "tiny-ep.yaml"
    manifest.write_text((ROOT / "deploy/samples/tiny-ep.yaml").read_text())

    run = RunLocal(bin_dir, manifest, "--watch")
    try:
        grpc_url = run.wait_for(r"grpc://(127\.0\.0\.1:\d+)").group(1)
        http_url = run.wait_for(r"(http://127\.0\.0\.1:\d+) ").group(1)
        check(any("pool a 1/1 groups ready, pool b 1/1 groups ready" in l for l in run.lines), "both pools ready")

        client = openai.OpenAI(base_url=f"{http_url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Hello"}])
        check(reply.usage.completion_tokens == 8, "the OpenAI client is answered")
        responses = generate(pb, pb_grpc, grpc_url, "The operator", 6)
        check(sum(len(r.token_ids) for r in responses) == 6 and responses[-1].finish_reason != 0,
              "a gRPC client is answered")

        load = Load(client)
        time.sleep(2)
        pid = int(next(re.search(r"pid (\d+)", l).group(1) for l in run.lines if l.startswith("a/0/1: started")))
        os.kill(pid, signal.SIGKILL)
        run.wait_for(r"^a/0/1: exited")
        restarted = run.wait_for(r"^a/0/1: started \(pid \d+, grpc (\S+)\)").group(1)
        run.wait_for(r"pool a 1/1 groups ready, pool b 1/1 groups ready")
        time.sleep(2)
        outcomes = load.take()
        lost = [e for started, e in outcomes if e and not started]
        check(len(outcomes) > 0 and not lost,
              f"a killed worker: {len(outcomes)} requests, none failed before its response began ({lost[:3]})")
        responses = generate(pb, pb_grpc, restarted, "Back again", 4)
        check(sum(len(r.token_ids) for r in responses) == 4, "the restarted rank serves in its re-formed group")

        manifest.write_text(manifest.read_text().replace("maxBatchTokens: 2048", "maxBatchTokens: 1024"))
        run.wait_for(r"changed; applying")
        first = run.wait_for(r"^(a|b)/0: retiring").group(1)
        run.wait_for(rf"^{first}/0: starting revision")
        other = "b" if first == "a" else "a"
        run.wait_for(rf"^{other}/0: retiring", timeout=180)
        run.wait_for(rf"^{other}/0: starting revision")
        run.wait_for(r"pool a 1/1 groups ready, pool b 1/1 groups ready")
        time.sleep(2)
        outcomes = load.take()
        failed = [e for _, e in outcomes if e]
        check(len(outcomes) > 0 and not failed,
              f"a rolling replacement, one pool at a time: {len(outcomes)} requests, none failed ({failed[:3]})")

        scaled = manifest.read_text().replace("podsPerGroup: 2\n      replicas: 1", "podsPerGroup: 2\n      replicas: 2")
        manifest.write_text(scaled)
        run.wait_for(r"^a/1: starting revision")
        run.wait_for(r"pool a 2/2 groups ready, pool b 1/1 groups ready")
        manifest.write_text(scaled.replace("podsPerGroup: 2\n      replicas: 2", "podsPerGroup: 2\n      replicas: 1"))
        run.wait_for(r"^a/1: retiring")
        run.wait_for(r"^a/1: stopped")
        time.sleep(2)
        load.stop()
        outcomes = load.take()
        failed = [e for _, e in outcomes if e]
        check(len(outcomes) > 0 and not failed,
              f"pool a scaled to two groups and back: {len(outcomes)} requests, none failed ({failed[:3]})")

        pids = run.pids()
        run.proc.send_signal(signal.SIGINT)
        code = run.proc.wait(timeout=120)
        check(code == 0, f"SIGINT: run-local exits 0 (got {code})")
        left = [p for p in pids if alive(p)]
        check(not left, f"SIGINT: none of its {len(pids)} processes is left ({left})")
    finally:
        if run.proc.poll() is None:
            run.proc.kill()

    # The autoscaling sample with a second, lighter pool that takes the spill-over, and
    # shorter windows than its own to keep CI short.
    one_pool = """    - name: cpu
      gpusPerPod: 1
      minReplicas: 0
      maxReplicas: 3
"""
    two_pools = """    - name: spill
      gpusPerPod: 1
      minReplicas: 0
      maxReplicas: 1
      weight: 1
    - name: cpu
      gpusPerPod: 1
      minReplicas: 0
      maxReplicas: 2
      weight: 2
"""
    sample = (ROOT / "deploy/samples/tiny-autoscaling.yaml").read_text()
    check(one_pool in sample, "the autoscaling sample has the pool this check extends")
    manifest = work / "tiny-autoscaling.yaml"
    manifest.write_text(sample.replace(one_pool, two_pools)
                        .replace("scaleDownWindowSeconds: 30", "scaleDownWindowSeconds: 10")
                        .replace("scaleToZeroAfterSeconds: 60", "scaleToZeroAfterSeconds: 15"))
    run = RunLocal(bin_dir, manifest)
    try:
        http_url = run.wait_for(r"(http://127\.0\.0\.1:\d+) ").group(1)
        check(not any("started (pid" in l for l in run.lines if not l.startswith("router")),
              "at zero groups only the router runs")
        client = openai.OpenAI(base_url=f"{http_url}/v1", api_key="none", max_retries=0)
        sent = time.time()
        stream = client.chat.completions.create(model=MODEL, stream=True, max_tokens=4, temperature=0,
                                                messages=[{"role": "user", "content": "Hello"}])
        next(iter(stream))
        woke = time.time() - sent
        for _ in stream:
            pass
        run.wait_for(r"autoscaling 0 → 1 groups: woken from zero")
        check(True, f"the first request at zero woke a group and was answered (first token after {woke:.1f} s)")
        woken = run.wait_for(r"^(\w+)/\d+: starting").group(1)
        check(woken == "cpu", f"it woke in the heavier pool ({woken})")
        loads = [Load(client, threads=10)]
        run.wait_for(r"autoscaling 1 → 2 groups", timeout=60)
        started = run.wait_for(r"^(\w+)/\d+: starting").group(1)
        check(started == "cpu", f"10 streams: a second group, in the heavier pool ({started})")
        loads.append(Load(client, threads=10))
        run.wait_for(r"autoscaling 2 → 3 groups", timeout=60)
        started = run.wait_for(r"^(\w+)/\d+: starting").group(1)
        check(started == "spill", f"20 streams: the heavier pool is at its maximum, the third group spills ({started})")
        run.wait_for(r"pool spill 1/1 groups ready, pool cpu 2/2 groups ready")
        for load in loads:
            load.stop()
        outcomes = [o for load in loads for o in load.take()]
        failed = [e for _, e in outcomes if e]
        check(not failed, f"10 then 20 streams: {len(outcomes)} requests, none failed")
        retired = run.wait_for(r"^(\w+)/\d+: retiring", timeout=60).group(1)
        check(retired == "spill", f"idle: the spill-over group goes first ({retired})")
        run.wait_for(r"autoscaling 1 → 0 groups: no request for 15 s", timeout=120)
        run.wait_for(r"pool spill 0/0 groups ready, pool cpu 0/0 groups ready")
        check(True, "idle: one group after the scale-down window, none after 15 s without a request")
        run.proc.send_signal(signal.SIGINT)
        run.proc.wait(timeout=120)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()

    run = RunLocal(bin_dir, ROOT / "deploy/samples/tiny.yaml")
    run.wait_for(r"http://127\.0\.0\.1:\d+")
    pids = run.pids()
    run.proc.kill()
    run.proc.wait()
    deadline = time.time() + 10
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    check(not any(alive(p) for p in pids), f"SIGKILL: its {len(pids)} processes die with run-local")


if __name__ == "__main__":
    main()
