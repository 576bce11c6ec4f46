"""Chat traffic with shared system prompts over two ranks behind the router: routing
policies side by side (`cache-aware`, `prefix-affinity`, `least-load`).

Two `deepseek-worker serve` processes (one compute thread each, so the two share the
machine's 2 cores evenly) on the bench model, each with a KV cache that holds about half of
the system prompts, behind one `deepseek-router --policy P`. The workers prefill in chunks
of `--prefill-chunk` tokens, the unit in which they reuse cached KV, so that a system prompt
is whole chunks. The workload: `--prompts`
system prompts of `--system-tokens` tokens; each request is one of them (drawn from a
seeded generator, the same sequence for every policy) plus a question of its own, answered
with `--new-tokens` greedy tokens; `--concurrency` clients send them back to back over gRPC.
Reported per policy: requests/s, output tokens/s, time to first token p50/p99, and the prompt
tokens the workers found cached (from each answer's usage). Writes
bench/router/cache_routing.json and prints a Markdown table.

Rerun (from the repository root, after bench/engine's setup and model):
  cargo build --release -p deepseek-worker -p deepseek-router
  .tools/fixtures-venv/bin/python bench/router/bench_cache_routing.py
"""

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench/worker"))
from bench_concurrency import cpu_name, free_port, percentile, stubs, wait_ready  # noqa: E402


def workload(args):
    """The system prompts, and the requests as (system prompt, question) token lists."""
    rng = random.Random(7)
    systems = [[rng.randrange(10, 30000) for _ in range(args.system_tokens)] for _ in range(args.prompts)]
    requests = []
    for n in range(args.requests):
        system = systems[rng.randrange(args.prompts)]
        question = [rng.randrange(10, 30000) for _ in range(args.question_tokens)]
        requests.append(system + question)
    return requests


def run(policy, args, pb, pb_grpc, requests):
    import grpc

    ports = [free_port() for _ in range(2)]
    env = dict(os.environ, RAYON_NUM_THREADS="1", RUST_LOG="warn")
    procs = [subprocess.Popen([args.worker_bin, "serve", "--model", args.model, "--listen", f"127.0.0.1:{port}",
                               "--kv-cache-blocks", str(args.kv_blocks), "--max-seqs", "16",
                               "--chunked-prefill-size", str(args.prefill_chunk)], env=env)
             for port in ports]
    router_port = free_port()
    procs.append(subprocess.Popen([args.router_bin, "--grpc-listen", f"127.0.0.1:{router_port}",
                                   "--http-listen", f"127.0.0.1:{free_port()}",
                                   "--metrics-listen", "", "--policy", policy, "--health-interval-ms", "200",
                                   *[a for port in ports for a in ("--backend", f"addr=127.0.0.1:{port}")]],
                                  env=dict(os.environ, RUST_LOG="warn")))
    try:
        for port in ports:
            wait_ready(pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}")), pb, 300)
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{router_port}"))
        wait_ready(stub, pb, 60)
        time.sleep(1)  # a health check round: the router knows each cache's size
        records, lock, queue = [], threading.Lock(), list(enumerate(requests))

        def client():
            while True:
                with lock:
                    if not queue:
                        return
                    _, prompt = queue.pop(0)
                request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                             stopping=pb.StoppingCriteria(max_new_tokens=args.new_tokens,
                                                                          ignore_eos=True))
                start, first, tokens, cached = time.perf_counter(), None, 0, 0
                for message in stub.Generate(request, timeout=600):
                    if message.token_ids and first is None:
                        first = time.perf_counter()
                    tokens += len(message.token_ids)
                    if message.HasField("usage"):
                        cached = message.usage.cached_prompt_tokens
                with lock:
                    records.append({"ttft": first - start, "tokens": tokens, "prompt": len(prompt), "cached": cached})

        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - began
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
    ttft = [r["ttft"] for r in records]
    return {"policy": policy, "requests": len(records), "wall_s": wall, "requests_per_s": len(records) / wall,
            "output_tokens_per_s": sum(r["tokens"] for r in records) / wall,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "cached_prompt_share": sum(r["cached"] for r in records) / sum(r["prompt"] for r in records)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / ".tools/bench-model/bench-small"))
    parser.add_argument("--worker-bin", default=str(ROOT / "target/release/deepseek-worker"))
    parser.add_argument("--router-bin", default=str(ROOT / "target/release/deepseek-router"))
    parser.add_argument("--policies", default="cache-aware,prefix-affinity,least-load")
    parser.add_argument("--out", default=str(ROOT / "bench/router/cache_routing.json"))
    parser.add_argument("--prompts", type=int, default=4, help="distinct system prompts")
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--question-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--kv-blocks", type=int, default=80,
                        help="each rank's KV cache in 16-token blocks: about half the system prompts")
    parser.add_argument("--prefill-chunk", type=int, default=128,
                        help="the worker reuses cached KV in whole prefill chunks: a divisor of --system-tokens")
    args = parser.parse_args()

    pb, pb_grpc = stubs(pathlib.Path(tempfile.mkdtemp()))
    requests = workload(args)
    rows = []
    for policy in args.policies.split(","):
        rows.append(run(policy, args, pb, pb_grpc, requests))
        print(json.dumps(rows[-1]), flush=True)
    cpu = cpu_name()
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cpu": cpu, "cores": os.cpu_count(),
              "model": args.model, **{k: v for k, v in vars(args).items() if k not in ("model", "worker_bin",
                                                                                       "router_bin", "policies", "out")},
              "policies": rows}
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    base = next((r for r in rows if r["policy"] == "least-load"), rows[-1])
    print("\n| policy | requests/s | × least-load | TTFT p50 / p99 ms | prompt tokens cached |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['requests_per_s']:.2f} | {r['requests_per_s'] / base['requests_per_s']:.2f} | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {100 * r['cached_prompt_share']:.0f}% |")


if __name__ == "__main__":
    main()
