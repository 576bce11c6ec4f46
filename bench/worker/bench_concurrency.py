"""Worker throughput and latency against concurrency, over real gRPC.

Starts `deepseek-worker serve` on the bench model, then for each concurrency level runs that
many streams at once (each: 3 requests back to back, each a 32-token prompt and 32 greedy
tokens, ignore_eos) and reports total
output tokens/s, and p50/p99 time to first token and inter-token latency as the client sees
them. Writes bench/worker/results.json and prints a Markdown table.

Rerun (from the repository root, after bench/engine's setup and model):
  .tools/fixtures-venv/bin/pip install grpcio grpcio-tools
  cargo build --release -p deepseek-worker
  .tools/fixtures-venv/bin/python bench/worker/bench_concurrency.py
"""

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]


def stubs(out_dir):
    from grpc_tools import protoc

    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                      "deepseek/v1/inference.proto"])
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(out_dir))
    from deepseek.v1 import inference_pb2, inference_pb2_grpc

    return inference_pb2, inference_pb2_grpc


def wait_port(port, deadline_s=30):
    """Returns once something listens on the loopback port."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_name():
    """The CPU's model name, to go with every figure."""
    with open("/proc/cpuinfo") as info:
        return next((l.split(":", 1)[1].strip() for l in info if l.startswith("model name")), "?")


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def run_streams(stub_of, pb, streams, args):
    """`streams` concurrent clients, client i on `stub_of(i)`, each sending
    `args.requests_per_stream` requests back to back; returns every request's record and
    the wall time."""
    results = []

    def client(i):
        for k in range(args.requests_per_stream):
            prompt = [(7 * i + 13 * j + 101 * k) % 30000 + 10 for j in range(args.prompt_len)]
            one_stream(stub_of(i), pb, prompt, args.new_tokens, results)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - began


def wait_ready(stub, pb, seconds):
    """Polls ModelInfo until the worker answers (it is loaded)."""
    import grpc

    deadline = time.time() + seconds
    while True:
        try:
            stub.ModelInfo(pb.ModelInfoRequest())
            return
        except grpc.RpcError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def one_stream(stub, pb, prompt, new_tokens, out):
    start = time.perf_counter()
    times = []
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                 stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True))
    tokens = 0
    for message in stub.Generate(request):
        if message.token_ids:
            times.append(time.perf_counter())
            tokens += len(message.token_ids)
    out.append({"start": start, "times": times, "tokens": tokens})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / ".tools/bench-model/bench-small"))
    parser.add_argument("--worker-bin", default=os.environ.get("WORKER_BIN", str(ROOT / "target/release/deepseek-worker")))
    parser.add_argument("--levels", default="1,4,16,32,64")
    parser.add_argument("--worker-args", default="",
                        help="more `serve` flags, space-separated (e.g. '--cpu-kernels avx2')")
    parser.add_argument("--out", default=str(ROOT / "bench/worker/results.json"))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests-per-stream", type=int, default=3,
                        help="requests each stream sends back to back (steadies the figures)")
    args = parser.parse_args()

    import grpc

    pb, pb_grpc = stubs(pathlib.Path(tempfile.mkdtemp()))
    port = free_port()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), RUST_LOG="warn")
    worker = subprocess.Popen([args.worker_bin, "serve", "--model", args.model, "--listen", f"127.0.0.1:{port}",
                               "--max-seqs", "64", "--max-batch-tokens", "4096", *args.worker_args.split()], env=env)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.InferenceStub(channel)
        wait_ready(stub, pb, 120)
        # warm up
        one_stream(stub, pb, list(range(10, 10 + args.prompt_len)), 4, [])
        rows = []
        for level in [int(x) for x in args.levels.split(",")]:
            results, wall = run_streams(lambda i: stub, pb, level, args)
            tokens = sum(r["tokens"] for r in results)
            ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
            itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
            rows.append({"streams": level, "output_tokens_per_s": tokens / wall, "wall_s": wall,
                         "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
                         "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    single = rows[0]["output_tokens_per_s"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cpu": cpu_name(),
              "worker_bin": args.worker_bin, "worker_args": args.worker_args, "model": args.model,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "threads": args.threads,
              "requests_per_stream": args.requests_per_stream, "levels": rows,
              "scaling_vs_one_stream": {str(r["streams"]): r["output_tokens_per_s"] / single for r in rows}}
    out = pathlib.Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| streams | output tok/s | × one stream | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['streams']} | {r['output_tokens_per_s']:.1f} | {r['output_tokens_per_s'] / single:.2f} | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} |")


if __name__ == "__main__":
    main()
