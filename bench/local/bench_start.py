"""Time from `run-local` to the first token, on the tiny model (the README's run command).

For each of `--runs` runs: start `deepseek-operator run-local -f SAMPLE`, read its stdout
until it prints the HTTP URL (every group ready), then stream one chat completion through
the official OpenAI client and note when its first content token arrives; stop it with
SIGINT and note how long stopping takes. The reference, same run: one `deepseek-worker serve`
started alone, timed to its "serving" log line and its first token over gRPC, on the same model.

  python bench/local/bench_start.py --bin-dir target/release [--sample deploy/samples/tiny.yaml]

Prints a JSON object with the medians (seconds) and every run.
"""

import argparse
import os
import json
import pathlib
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

import grpc
import openai

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import grpc_stubs  # noqa: E402


def cpu_name():
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def first_token(client, since, max_tokens=8):
    """Seconds from `since` to the first content token of a streamed chat completion (read
    to its end)."""
    stream = client.chat.completions.create(model="tiny-deepseek", stream=True, max_tokens=max_tokens,
                                            messages=[{"role": "user", "content": "Hello"}])
    took = None
    for chunk in stream:
        if took is None and chunk.choices and chunk.choices[0].delta.content:
            took = time.perf_counter() - since
    return took


def run_local_once(bin_dir, sample):
    started = time.perf_counter()
    proc = subprocess.Popen([bin_dir / "deepseek-operator", "run-local", "-f", sample], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = None
    for line in proc.stdout:
        match = re.search(r"(http://127\.0\.0\.1:\d+) ", line)
        if match:
            url = match.group(1)
            break
    ready = time.perf_counter() - started
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    first = first_token(client, started)
    stopping = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    return {"ready_s": ready, "first_token_s": first, "stop_s": time.perf_counter() - stopping}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_alone_once(bin_dir, model, stubs):
    pb, pb_grpc = stubs
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([bin_dir / "deepseek-worker", "serve", "--model", model, "--listen", f"127.0.0.1:{port}"],
                            cwd=ROOT, env={**os.environ, "NO_COLOR": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if "serving" in line:
            break
    ready = time.perf_counter() - started
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.InferenceStub(channel)
    request = pb.GenerateRequest(text="Hello", stopping=pb.StoppingCriteria(max_new_tokens=8))
    first_token = None
    for _ in stub.Generate(request, timeout=60):
        if first_token is None:
            first_token = time.perf_counter() - started
    channel.close()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    return {"ready_s": ready, "first_token_s": first_token}


def main():
    import tempfile
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", default=str(ROOT / "target/release"))
    parser.add_argument("--sample", default="deploy/samples/tiny.yaml")
    parser.add_argument("--model", default="tests/fixtures/demo-v3", help="the sample's model, for the worker alone")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    bin_dir = pathlib.Path(args.bin_dir).resolve()
    generated = grpc_stubs.generate(tempfile.mkdtemp())
    local = [run_local_once(bin_dir, args.sample) for _ in range(args.runs)]
    alone = [worker_alone_once(bin_dir, args.model, generated) for _ in range(args.runs)]
    median = lambda runs, key: round(statistics.median(r[key] for r in runs), 3)
    print(json.dumps({
        "cpu": cpu_name(), "bin_dir": str(args.bin_dir), "sample": args.sample, "model": args.model,
        "run_local": {k: median(local, k) for k in ("ready_s", "first_token_s", "stop_s")},
        "worker_alone": {k: median(alone, k) for k in ("ready_s", "first_token_s")},
        "runs": {"run_local": local, "worker_alone": alone},
    }, indent=2))


if __name__ == "__main__":
    main()
