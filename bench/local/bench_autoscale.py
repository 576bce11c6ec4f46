"""The autoscaler under `run-local`: waking from zero, and following a load ramp.

Runs `deepseek-operator run-local -f deploy/samples/tiny-autoscaling.yaml` (zero to three
groups, 6 requests a group; its windows shortened by `--down-window` and `--zero-after`),
then:

1. wake: with the deployment at zero groups, streams one chat completion (official OpenAI
   client) and times its first token from the request; then, the group up, the same request
   again (warm), same run. Repeated `--wakes` times, each after it is back at zero.
2. ramp: 0 → 4 → 8 → 12 → 16 concurrent streams, `--step` seconds each, then none; every
   second it records the streams, the groups they call for (streams ÷ 6, rounded up, at most
   3), and the groups desired and ready (from run-local's status lines). Reports, per step,
   how long after it the groups it called for were ready, and how long after the last
   stream the deployment was back at zero (every group's processes stopped).

  python bench/local/bench_autoscale.py --bin-dir target/debug

Prints a JSON object.
"""

import argparse
import json
import math
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import openai

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "worker"))
from bench_concurrency import cpu_name  # noqa: E402
from bench_start import first_token  # noqa: E402

PER_GROUP, MAX_GROUPS = 6, 3


class RunLocal:
    """run-local as a child; the latest ready count of its pool, kept from its stdout."""

    def __init__(self, bin_dir, manifest):
        self.proc = subprocess.Popen([bin_dir / "deepseek-operator", "run-local", "-f", manifest],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        self.ready, self.desired, self.url, self.lines = 0, 0, None, []
        self.started, self.stopped = 0, 0
        self.url_seen = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter(), line.rstrip("\n")))
            self.started += bool(re.match(r"\w+/\d+: starting", line))
            self.stopped += bool(re.match(r"\w+/\d+: stopped", line))
            if m := re.search(r"pool cpu (\d+)/(\d+) groups ready", line):
                self.ready, self.desired = int(m.group(1)), int(m.group(2))
            if (m := re.search(r"(http://127\.0\.0\.1:\d+) ", line)) and not self.url:
                self.url = m.group(1)
                self.url_seen.set()

    def at_zero(self):
        """No group wanted, and every group's processes stopped (a retiring group still
        serves until the router has re-read its backends)."""
        return self.desired == 0 and self.started == self.stopped

    def until(self, condition, timeout):
        deadline = time.perf_counter() + timeout
        while not condition():
            if time.perf_counter() > deadline:
                raise SystemExit("timed out")
            time.sleep(0.1)


class Streams:
    """`n` threads streaming chat completions back to back; `set(n)` changes how many."""

    def __init__(self, client):
        self.client, self.wanted, self.errors = client, 0, []
        self.threads = []

    def _loop(self, i):
        while i < self.wanted:
            try:
                for _ in self.client.chat.completions.create(
                        model="tiny-deepseek", stream=True, max_tokens=24,
                        messages=[{"role": "user", "content": f"stream {i}"}]):
                    pass
            except openai.APIError as e:
                self.errors.append(str(e))

    def set(self, n):
        self.wanted = n
        for i in range(n):
            if i == len(self.threads):
                self.threads.append(None)
            if self.threads[i] is None or not self.threads[i].is_alive():
                self.threads[i] = threading.Thread(target=self._loop, args=(i,), daemon=True)
                self.threads[i].start()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", default=str(ROOT / "target/debug"))
    parser.add_argument("--wakes", type=int, default=3)
    parser.add_argument("--step", type=float, default=20.0)
    parser.add_argument("--down-window", type=int, default=10)
    parser.add_argument("--zero-after", type=int, default=15)
    args = parser.parse_args()
    bin_dir = pathlib.Path(args.bin_dir).resolve()
    manifest = pathlib.Path(tempfile.mkdtemp(prefix="bench-autoscale-")) / "tiny-autoscaling.yaml"
    manifest.write_text((ROOT / "deploy/samples/tiny-autoscaling.yaml").read_text()
                        .replace("scaleDownWindowSeconds: 30", f"scaleDownWindowSeconds: {args.down_window}")
                        .replace("scaleToZeroAfterSeconds: 60", f"scaleToZeroAfterSeconds: {args.zero_after}"))
    run = RunLocal(bin_dir, manifest)
    try:
        run.url_seen.wait(60)
        client = openai.OpenAI(base_url=f"{run.url}/v1", api_key="none", max_retries=0)
        wakes = []
        for _ in range(args.wakes):
            run.until(run.at_zero, 120)
            wake = first_token(client, time.perf_counter(), max_tokens=4)
            warm = first_token(client, time.perf_counter(), max_tokens=4)
            wakes.append({"wake_s": round(wake, 3), "warm_s": round(warm, 3)})

        run.until(run.at_zero, 120)
        streams, timeline = Streams(client), []
        ramp_start = time.perf_counter()
        reached = []
        for n in [4, 8, 12, 16]:
            streams.set(n)
            step_start = time.perf_counter()
            called = min(MAX_GROUPS, math.ceil(n / PER_GROUP))
            ready_after = None
            while time.perf_counter() - step_start < args.step:
                if ready_after is None and run.ready >= called:
                    ready_after = time.perf_counter() - step_start
                timeline.append([round(time.perf_counter() - ramp_start, 1), n, called, run.desired, run.ready])
                time.sleep(1)
            reached.append({"streams": n, "groups_called_for": called,
                            "ready_after_s": None if ready_after is None else round(ready_after, 1)})
        streams.set(0)
        idle_start = time.perf_counter()
        while not run.at_zero():
            if time.perf_counter() - idle_start > 300:
                raise SystemExit("not back at zero within 300 s")
            timeline.append([round(time.perf_counter() - ramp_start, 1), 0, 0, run.desired, run.ready])
            time.sleep(1)
        to_zero = time.perf_counter() - idle_start
    finally:
        run.proc.send_signal(signal.SIGINT)
        run.proc.wait(timeout=120)
    print(json.dumps({
        "machine": f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores",
        "build": bin_dir.name,
        "sample": "deploy/samples/tiny-autoscaling.yaml",
        "windows": {"scale_up_s": 2, "scale_down_s": args.down_window, "to_zero_after_s": args.zero_after},
        "wake_median_s": statistics.median(w["wake_s"] for w in wakes),
        "warm_median_s": statistics.median(w["warm_s"] for w in wakes),
        "wakes": wakes,
        "ramp_step_s": args.step,
        "ramp": reached,
        "ramp_errors": len(streams.errors),
        "idle_to_zero_s": round(to_zero, 1),
        "timeline": timeline,
    }, indent=1))


if __name__ == "__main__":
    main()
