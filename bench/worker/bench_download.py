"""`deepseek-worker download` against curl, fetching the same checkpoint from the same server.

nginx (one worker process, sendfile) plays the Hugging Face Hub on loopback: the revision
endpoint answers with a fixed commit and the files' sizes, `resolve/COMMIT/PATH` redirects
to static storage, which serves ranges. The checkpoint is bench-small's directory (one
1.6 GB safetensors file and its config and tokenizer files). Each run downloads it whole
into an empty directory, then the directory is deleted:

- ours: `deepseek-worker download --repo bench/small --dir D` (resolves the revision, follows
  the redirects, checks sizes and the safetensors header before renaming into place);
- curl: `curl -sfL -o D/FILE URL` for each file's `resolve` URL, one after another (the
  large file dominates; neither side splits a file into ranges).

Both write into `--dest` (`/dev/shm` by default: memory, so that the disk's pace and its
writeback of the previous run are not what is measured). Runs alternate, `--runs` each;
medians. Rerun (nginx from Debian: apt-get install
nginx-light; the model from bench/engine/make_bench_model.py):

  python3 bench/worker/bench_download.py --bin target/release/deepseek-worker

Prints a JSON object.
"""

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "worker"))
from bench_concurrency import cpu_name, free_port, wait_port  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"

NGINX_CONF = """
worker_processes 1;
user root;
daemon off;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location = /api/models/bench/small/revision/main {{
      default_type application/json;
      return 200 '{revision}';
    }}
    location /bench/small/resolve/ {{
      rewrite ^/bench/small/resolve/[^/]+/(.*)$ /storage/$1 redirect;
    }}
    location /storage/ {{ alias {model}/; }}
  }}
}}
"""


def timed(command, **kwargs):
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", default=str(ROOT / "target/release/deepseek-worker"))
    parser.add_argument("--model", default=str(ROOT / ".tools/bench-model/bench-small"))
    parser.add_argument("--runs", type=int, default=3)
    # In memory, so that the disk's own pace (and its writeback of the last run) is not what
    # is measured.
    parser.add_argument("--dest", default="/dev/shm")
    args = parser.parse_args()
    model = pathlib.Path(args.model).resolve()
    files = sorted(p.name for p in model.iterdir() if p.is_file())
    total = sum((model / f).stat().st_size for f in files)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-download-"))
    port = free_port()
    revision = json.dumps({"sha": COMMIT, "siblings": [
        {"rfilename": f, "size": (model / f).stat().st_size} for f in files]})
    (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=port, model=model, revision=revision))
    nginx = subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-e", str(work / "error.log")])
    try:
        wait_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        ours, curl = [], []
        dest_root = pathlib.Path(tempfile.mkdtemp(prefix="bench-download-", dir=args.dest))
        for _ in range(args.runs):
            dest = dest_root / "ours"
            ours.append(timed([args.bin, "download", "--repo", "bench/small", "--dir", str(dest)],
                              env={**os.environ, "HF_ENDPOINT": endpoint}))
            assert all((dest / f).stat().st_size == (model / f).stat().st_size for f in files)
            shutil.rmtree(dest)
            dest = dest_root / "curl"
            dest.mkdir()
            start = time.perf_counter()
            for f in files:
                subprocess.run(["curl", "-sfL", "-o", str(dest / f),
                                f"{endpoint}/bench/small/resolve/{COMMIT}/{f}"], check=True)
            curl.append(time.perf_counter() - start)
            shutil.rmtree(dest)
        dest_root.rmdir()
    finally:
        nginx.terminate()
        nginx.wait()
        shutil.rmtree(work, ignore_errors=True)
    gb = total / 1e9
    ours_s, curl_s = statistics.median(ours), statistics.median(curl)
    print(json.dumps({
        "machine": f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores",
        "binary": args.bin,
        "bytes": total,
        "files": len(files),
        "ours_s": [round(s, 3) for s in ours],
        "curl_s": [round(s, 3) for s in curl],
        "ours_gb_per_s": round(gb / ours_s, 3),
        "curl_gb_per_s": round(gb / curl_s, 3),
        "ours_vs_curl": round(curl_s / ours_s, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
