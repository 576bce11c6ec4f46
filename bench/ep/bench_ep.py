"""Expert parallelism on one machine: EP=1, EP=2 and EP=4 on the bench model, side by side.

For each group size N, starts N `deepseek-worker serve` processes on loopback (one rank
each, `--ep-wire bf16`, the machine's 2 cores shared: RAYON_NUM_THREADS = max(1, 2 / N)),
spreads 8 concurrent streams over the ranks (each rank serves its own requests; every rank
holds 1/N of the routed experts), and reports total output tokens/s, each rank's resident
memory after the run, and the expert-parallel bytes each token moved per MoE layer against
the bound top-k × hidden × 2 bytes (bf16) each way.
With --tls-too, every size runs a second time over mutual TLS (the test CA in
tests/fixtures/tls): the client's gRPC and the ranks' expert-parallel links, as
`spec.workerTls` gives a cluster, to show what the encryption costs.
Writes bench/ep/results.json and prints a Markdown table.

Rerun (from the repository root, after bench/engine's setup and model):
  cargo build --release -p deepseek-worker
  .tools/fixtures-venv/bin/python bench/ep/bench_ep.py
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench/worker"))
from bench_concurrency import free_port, one_stream, run_streams, stubs, wait_ready  # noqa: E402


def rss_mib(pid):
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def counter(text, name):
    match = re.search(rf"^{name}(?:_total)? (\d+)", text, re.M)
    return int(match.group(1)) if match else 0


TLS = ROOT / "tests/fixtures/tls"


def channel(port, tls):
    import grpc

    if not tls:
        return grpc.insecure_channel(f"127.0.0.1:{port}")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(TLS / "ca.crt").read_bytes(), private_key=(TLS / "router-a.key").read_bytes(),
        certificate_chain=(TLS / "router-a.crt").read_bytes())
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def run_group(args, pb, pb_grpc, size, tls):
    grpc_ports = [free_port() for _ in range(size)]
    metrics_ports = [free_port() for _ in range(size)]
    peers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(size))
    env = dict(os.environ, RAYON_NUM_THREADS=str(max(1, args.threads // size)), RUST_LOG="warn")
    procs = []
    for rank in range(size):
        cmd = [args.worker_bin, "serve", "--model", args.model, "--listen", f"127.0.0.1:{grpc_ports[rank]}",
               "--metrics-listen", f"127.0.0.1:{metrics_ports[rank]}", "--max-seqs", "64"]
        if size > 1:
            cmd += ["--group-size", str(size), "--rank", str(rank), "--peers", peers, "--ep-wire", "bf16"]
        if tls:
            cmd += ["--tls-cert", str(TLS / "router-a.crt"), "--tls-key", str(TLS / "router-a.key"),
                    "--tls-client-ca", str(TLS / "ca.crt")]
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        stubs_by_rank = [pb_grpc.InferenceStub(channel(p, tls)) for p in grpc_ports]
        for stub in stubs_by_rank:
            wait_ready(stub, pb, 300)
        for stub in stubs_by_rank:  # warm up (every rank takes part in every pass)
            one_stream(stub, pb, list(range(10, 10 + args.prompt_len)), 4, [])
        results, wall = run_streams(lambda i: stubs_by_rank[i % size], pb, args.streams, args)
        scrapes = [urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics").read().decode() for p in metrics_ports]
        sent = sum(counter(s, "deepseek_worker_expert_parallel_bytes_sent") for s in scrapes)
        tokens_run = sum(counter(s, "deepseek_worker_prompt_tokens") + counter(s, "deepseek_worker_generation_tokens")
                         for s in scrapes)
        row = {"ranks": size, "tls": tls, "output_tokens_per_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
               "rss_mib": [round(rss_mib(p.pid)) for p in procs], "bytes_sent": sent, "tokens_run": tokens_run}
        print(json.dumps(row), flush=True)
        return row
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / ".tools/bench-model/bench-small"))
    parser.add_argument("--worker-bin", default=str(ROOT / "target/release/deepseek-worker"))
    parser.add_argument("--sizes", default="1,2,4")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tls-too", action="store_true", help="each size again over mutual TLS")
    args = parser.parse_args()
    pb, pb_grpc = stubs(pathlib.Path(tempfile.mkdtemp()))
    config = json.loads((pathlib.Path(args.model) / "config.json").read_text())
    moe_layers = config["num_hidden_layers"] - config.get("first_k_dense_replace", 0)
    bound = config["num_experts_per_tok"] * config["hidden_size"] * 2
    rows = [run_group(args, pb, pb_grpc, int(n), tls)
            for tls in ([False, True] if args.tls_too else [False]) for n in args.sizes.split(",")]
    single = rows[0]["output_tokens_per_s"]
    plain = {r["ranks"]: r["output_tokens_per_s"] for r in rows if not r["tls"]}
    for r in rows:
        # Dispatch and combine each cross once per MoE layer: bytes per token per layer, each way.
        r["bytes_per_token_layer_each_way"] = r["bytes_sent"] / max(1, r["tokens_run"]) / moe_layers / 2
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "model": args.model,
              "streams": args.streams, "bound_bytes_per_token_layer_each_way": bound, "rows": rows}
    (ROOT / "bench/ep/results.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n| ranks | links | output tok/s | × EP=1 plaintext | × same size plaintext | RSS per rank (MiB) "
          "| bytes / token / MoE layer, each way (bound) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        moved = f"{r['bytes_per_token_layer_each_way']:.0f} ({bound})" if r["ranks"] > 1 else "—"
        rate = r["output_tokens_per_s"]
        print(f"| {r['ranks']} | {'mutual TLS' if r['tls'] else 'plaintext'} | {rate:.1f} | {rate / single:.2f} | "
              f"{rate / plain[r['ranks']]:.2f} | {', '.join(str(m) for m in r['rss_mib'])} | {moved} |")


if __name__ == "__main__":
    main()
