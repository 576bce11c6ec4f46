"""Router overhead: a trivially fast fake worker called directly, through deepseek-router,
and through nginx's grpc_pass, side by side in one run.

The proxy under test (router or nginx, one worker process) gets CPU 1 to itself; the fake
worker and the load generator share CPU 0. For each path: a fixed 2,000 requests/s for
10 s (latency percentiles of whole `Generate` calls, each read to its end), then closed
loop at 64 concurrent calls for 10 s (throughput). Added latency = path minus direct.
Writes bench/router/results.json and prints a Markdown table.

Rerun (from the repository root; nginx from Debian: apt-get install nginx-light):
  cargo build --release -p deepseek-router --examples
  cargo build --release -p deepseek-router
  python3 bench/router/bench_router.py
"""

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench/worker"))
from bench_concurrency import wait_port  # noqa: E402

RELEASE = ROOT / "target/release"
PORTS = {"fake": 50061, "router": 50062, "router_http": 50063, "nginx": 50064}

NGINX_CONF = """
worker_processes 1;
daemon off;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream workers {{ server 127.0.0.1:{fake}; keepalive 128; keepalive_requests 100000000; }}
  server {{
    listen 127.0.0.1:{nginx} http2;
    http2_max_concurrent_streams 1024;
    http2_max_requests 100000000;
    keepalive_requests 100000000;
    location / {{ grpc_pass grpc://workers; }}
  }}
}}
"""


def load(port, *args):
    out = subprocess.run(["taskset", "-c", "0", RELEASE / "examples/load", "--target", f"127.0.0.1:{port}", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work = pathlib.Path(tempfile.mkdtemp())
    (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, **PORTS))
    procs = [
        subprocess.Popen(["taskset", "-c", "0", RELEASE / "examples/fake_worker", f"127.0.0.1:{PORTS['fake']}"]),
        subprocess.Popen(["taskset", "-c", "1", RELEASE / "deepseek-router",
                          "--grpc-listen", f"127.0.0.1:{PORTS['router']}",
                          "--http-listen", f"127.0.0.1:{PORTS['router_http']}", "--metrics-listen", "",
                          "--backend", f"addr=127.0.0.1:{PORTS['fake']}"],
                         env={"RUST_LOG": "warn", "PATH": "/usr/bin:/bin"}),
        subprocess.Popen(["taskset", "-c", "1", nginx, "-c", work / "nginx.conf", "-p", work]),
    ]
    try:
        for port in (PORTS["fake"], PORTS["router"], PORTS["nginx"]):
            wait_port(port)
        time.sleep(2)  # the router's first health check
        rows = []
        for name, port in (("direct", PORTS["fake"]), ("deepseek-router", PORTS["router"]),
                           ("nginx grpc_pass", PORTS["nginx"])):
            load(port, "--rate", "500", "--seconds", "2")  # warm up connections
            at_rate = load(port, "--rate", "2000", "--seconds", "10")
            closed = load(port, "--concurrency", "64", "--seconds", "10")
            rows.append({"path": name, "at_2000": at_rate, "closed_64": closed})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    direct = rows[0]["at_2000"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": rows}
    (ROOT / "bench/router/results.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n| path | p50 / p99 ms at 2,000 req/s | added p50 / p99 ms | errors | max req/s (64 in flight) |")
    print("|---|---|---|---|---|")
    for r in rows:
        a, c = r["at_2000"], r["closed_64"]
        print(f"| {r['path']} | {a['p50_ms']:.3f} / {a['p99_ms']:.3f} | "
              f"{a['p50_ms'] - direct['p50_ms']:+.3f} / {a['p99_ms'] - direct['p99_ms']:+.3f} | "
              f"{a['errors'] + c['errors']} | {c['requests_per_s']:.0f} |")


if __name__ == "__main__":
    main()
