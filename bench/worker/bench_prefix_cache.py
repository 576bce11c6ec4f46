"""Time to first token with the prefix cache: a request whose long prefix was served before,
against the same request cold, in one run.

Starts `deepseek-worker serve` on the bench model (2 compute threads). Each round draws a
fresh `--prefix-tokens` prefix: first a request of that prefix and a suffix of its own is
sent (cold: nothing cached), then the same prefix with another suffix (warm: the prefix's
KV is reused). Both generate one token; time to first token is measured by the gRPC
client. Reported: median cold and warm TTFT over the rounds, their ratio, and the prompt
tokens the warm requests found cached (their usage). Writes bench/worker/prefix_cache.json.

Rerun (from the repository root, after bench/engine's setup and model):
  cargo build --release -p deepseek-worker
  .tools/fixtures-venv/bin/python bench/worker/bench_prefix_cache.py
"""

import argparse
import json
import os
import pathlib
import random
import statistics
import subprocess
import tempfile
import time

from bench_concurrency import cpu_name, free_port, stubs, wait_ready

ROOT = pathlib.Path(__file__).resolve().parents[2]


def first_token(stub, pb, prompt):
    """Seconds to the first token, and the prompt tokens found cached."""
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                 stopping=pb.StoppingCriteria(max_new_tokens=1, ignore_eos=True))
    start, first, cached = time.perf_counter(), None, 0
    for message in stub.Generate(request, timeout=600):
        if message.token_ids and first is None:
            first = time.perf_counter()
        if message.HasField("usage"):
            cached = message.usage.cached_prompt_tokens
    return first - start, cached


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / ".tools/bench-model/bench-small"))
    parser.add_argument("--worker-bin", default=str(ROOT / "target/release/deepseek-worker"))
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--suffix-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import grpc

    pb, pb_grpc = stubs(pathlib.Path(tempfile.mkdtemp()))
    port = free_port()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), RUST_LOG="warn")
    worker = subprocess.Popen([args.worker_bin, "serve", "--model", args.model, "--listen", f"127.0.0.1:{port}"],
                              env=env)
    rng = random.Random(11)
    draw = lambda n: [rng.randrange(10, 30000) for _ in range(n)]  # noqa: E731
    rounds = []
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        wait_ready(stub, pb, 300)
        first_token(stub, pb, draw(16))  # warm up
        for _ in range(args.rounds):
            prefix = draw(args.prefix_tokens)
            cold, cold_cached = first_token(stub, pb, prefix + draw(args.suffix_tokens))
            warm, warm_cached = first_token(stub, pb, prefix + draw(args.suffix_tokens))
            rounds.append({"cold_s": cold, "warm_s": warm, "cold_cached": cold_cached, "warm_cached": warm_cached})
            print(json.dumps(rounds[-1]), flush=True)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    cold = statistics.median(r["cold_s"] for r in rounds)
    warm = statistics.median(r["warm_s"] for r in rounds)
    cpu = cpu_name()
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cpu": cpu, "model": args.model,
              "prefix_tokens": args.prefix_tokens, "suffix_tokens": args.suffix_tokens, "threads": args.threads,
              "ttft_cold_median_s": cold, "ttft_warm_median_s": warm, "ratio": cold / warm, "rounds": rounds}
    (ROOT / "bench/worker/prefix_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| prefix | cold TTFT (median) | warm TTFT (median) | × lower | cached of warm prompt |\n|---|---|---|---|---|\n"
          f"| {args.prefix_tokens} + {args.suffix_tokens} tokens | {1e3 * cold:.0f} ms | {1e3 * warm:.0f} ms | "
          f"{cold / warm:.1f} | {rounds[-1]['warm_cached']} of {args.prefix_tokens + args.suffix_tokens} |")


if __name__ == "__main__":
    main()
