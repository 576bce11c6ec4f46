"""Serving from the GPU, end to end: `deepseek-worker serve --device cuda:0`, an expert-parallel
group of two GPU ranks in two processes (both on the one GPU, over the TCP mesh), the same
group as one pod's process running both ranks (`--ranks-per-pod 2 --ranks-per-gpu 2`), and a
CPU worker, each behind its own `deepseek-router`, asked the same greedy completions over the
OpenAI HTTP API, eight at once so that the workers batch them. The GPU answers must equal the
CPU's. Standard library only (GPU machines may lack our Python packages).

    python3 tests/gpu/serve_check.py BIN_DIR REPORT_JSON   # merges a "serve" entry into it
"""

import concurrent.futures
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests" / "fixtures" / "tiny-v3-bf16"
PROMPTS = [[(i * 37 + k * 11) % 384 for i in range(3 + 4 * k)] for k in range(8)]


def post(port, body):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)


def wait_ready(port, processes, deadline):
    while time.time() < deadline:
        if any(p.poll() is not None for p in processes):
            raise RuntimeError("a worker or router exited during start-up")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if json.load(r).get("data"):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"router on port {port} not ready in time")


def completions(port):
    bodies = [{"model": "tiny-v3-bf16", "prompt": p, "max_tokens": 16, "temperature": 0} for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return [r["choices"][0]["text"] for r in pool.map(lambda b: post(port, b), bodies)]


def main():
    bin_dir, report_path = Path(sys.argv[1]), Path(sys.argv[2])
    # name: ([(device, worker gRPC port, extra serve flags)], router gRPC, HTTP, metrics ports)
    mesh = "127.0.0.1:50181,127.0.0.1:50182"
    pod_mesh = "127.0.0.1:50183,127.0.0.1:50184"
    sides = {
        "gpu": ([("cuda:0", 50161, [])], 50171, 8171, 9171),
        "gpu-ep2": ([("cuda:0", 50163 + r, ["--group-size", "2", "--rank", str(r), "--peers", mesh])
                     for r in range(2)], 50173, 8173, 9173),
        "gpu-pod2": ([("cuda:0", 50165, ["--group-size", "2", "--ranks-per-pod", "2", "--ranks-per-gpu", "2",
                                         "--peers", pod_mesh])], 50174, 8174, 9174),
        "cpu": ([("cpu", 50162, [])], 50172, 8172, 9172),
    }
    processes = []
    result = {}
    try:
        for workers, grpc_port, http_port, metrics_port in sides.values():
            backends = []
            for device, worker_port, extra in workers:
                processes.append(subprocess.Popen(
                    [bin_dir / "deepseek-worker", "serve", "--model", MODEL, "--device", device,
                     "--listen", f"127.0.0.1:{worker_port}", "--kv-cache-blocks", "512", *extra], cwd=ROOT))
                backends += ["--backend", f"pool={device},addr=127.0.0.1:{worker_port}"]
            processes.append(subprocess.Popen(
                [bin_dir / "deepseek-router", "--grpc-listen", f"127.0.0.1:{grpc_port}",
                 "--http-listen", f"127.0.0.1:{http_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
                 *backends], cwd=ROOT))
        deadline = time.time() + 120
        texts = {}
        for name, (_, _, http_port, _) in sides.items():
            wait_ready(http_port, processes, deadline)
            texts[name] = completions(http_port)
        differing = {name: sum(g != c for g, c in zip(texts[name], texts["cpu"])) for name in ("gpu", "gpu-ep2", "gpu-pod2")}
        result = {"passed": not any(differing.values()), "requests": len(PROMPTS), "differing": differing,
                  "detail": "8 concurrent greedy completions of 16 tokens through deepseek-router: one GPU "
                            "worker, two GPU ranks of an expert-parallel group in two processes and in "
                            "one (two ranks in one pod on one GPU), against a CPU worker"}
    except Exception as error:  # the report says what broke; the exit code fails the run
        result = {"passed": False, "error": repr(error)}
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(timeout=30)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["serve"] = result
    report["passed"] = bool(report.get("passed", False)) and result["passed"]
    report_path.write_text(json.dumps(report, indent=1))
    print("serve:", json.dumps(result))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
