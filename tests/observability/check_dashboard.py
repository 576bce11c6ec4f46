"""The chart's Grafana dashboard against a real Prometheus scraping a real local run.

No Grafana can be installed here (it is AGPL and not on the registries this project uses),
so this check does what Grafana would do with the dashboard's JSON and draws the result:

1. `deepseek-operator run-local --prometheus-targets FILE` runs deploy/samples/tiny-ep.yaml
   (two pools of two-rank expert-parallel groups) and keeps FILE a list of every process's
   `/metrics`;
2. Prometheus (built from its Go module, tests/observability/build-prometheus.sh) scrapes
   them through `file_sd_configs` every second: every target must be up, labelled with its
   deployment, component and pool;
3. streamed chat completions from the official OpenAI client load the deployment for a while,
   with a long shared prefix so the prefix cache hits;
4. the dashboard's variables are resolved as Grafana would (label values), and every query of
   every panel is evaluated over the load with Prometheus's range API: every query must
   return series and every panel some non-zero value;
5. the panels are drawn at their grid positions into a PNG (--png) to look at;
6. SIGINT: run-local stops and leaves the targets file empty.

  python tests/observability/check_dashboard.py --bin-dir target/debug \
      --prometheus "$(tests/observability/build-prometheus.sh)" --png dashboard.png
"""

import argparse
import json
import math
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import openai

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "local"))
from check_run_local import RunLocal, check  # noqa: E402

DASHBOARD = ROOT / "charts/deepseek-operator/dashboards/deepseek-serving.json"
SAMPLE = ROOT / "deploy/samples/tiny-ep.yaml"
MODEL = "tiny-deepseek"
# Grafana's $__rate_interval is at least four scrape intervals; the scrapes here are 1 s apart.
RATE_INTERVAL = "8s"
LOAD_SECONDS = 45
# Several KV blocks long (~160 tokens of the 256-token context), so repeated prompts find
# their prefix cached.
SHARED_PREFIX = " ".join(f"word{i}" for i in range(32))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, binary, targets, workdir):
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
            "scrape_configs": [{
                "job_name": "deepseek",
                "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
            }],
        }))
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.url("/-/ready"), timeout=1)
                return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"FAILED: Prometheus did not start (log: {self.log.name})")
                time.sleep(0.2)

    def url(self, path, **params):
        query = f"?{urllib.parse.urlencode(params, doseq=True)}" if params else ""
        return f"http://127.0.0.1:{self.port}{path}{query}"

    def api(self, path, **params):
        with urllib.request.urlopen(self.url(f"/api/v1/{path}", **params), timeout=30) as r:
            body = json.load(r)
        if body["status"] != "success":
            raise SystemExit(f"FAILED: {path} {params}: {body}")
        return body["data"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def load(client, threads, seconds):
    """Streamed chat completions from `threads` threads for `seconds`; returns the errors."""
    errors, stop_at = [], time.time() + seconds

    def loop(i):
        n = 0
        while time.time() < stop_at:
            n += 1
            try:
                stream = client.chat.completions.create(
                    model=MODEL, stream=True, max_tokens=24, temperature=0,
                    messages=[{"role": "user", "content": f"{SHARED_PREFIX} question {i}-{n % 3}"}])
                for _ in stream:
                    pass
            except openai.APIError as e:
                errors.append(f"{type(e).__name__}: {e}")

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return errors


def legend(fmt, metric):
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt) or str(metric)


def resolve_variables(prom, dashboard):
    """Each query variable's values as Grafana finds them (`label_values(SERIES, LABEL)`), the
    first taken (all, for a multi-value variable)."""
    values = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        series, label = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"]).groups()
        found = prom.api(f"label/{label}/values", **{"match[]": substitute(series, values)})
        check(found, f"variable ${var['name']} has values ({label} of {series}): {found}")
        found = sorted(found, key=lambda v: (len(v), v))
        values[var["name"]] = "|".join(found) if var.get("multi") else found[0]
    return values


def substitute(expr, values):
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name, value in values.items():
        expr = expr.replace(f"${name}", value)
    return expr


def evaluate(prom, dashboard, values, start, end):
    """Every panel's queries over [start, end]: {panel id: [(target, series list)]}."""
    results = {}
    for panel in dashboard["panels"]:
        results[panel["id"]] = []
        for target in panel["targets"]:
            expr = substitute(target["expr"], values)
            data = prom.api("query_range", query=expr, start=start, end=end, step="1s")
            series = [(legend(target["legendFormat"], s["metric"]),
                       [(float(t), float(v)) for t, v in s["values"]]) for s in data["result"]]
            check(series, f"{panel['title']!r}: {target['legendFormat']!r} returns series "
                          f"({len(series)})")
            results[panel["id"]].append((target, series))
        peak = max((abs(v) for _, series in results[panel["id"]] for _, points in series
                    for _, v in points if math.isfinite(v)), default=0.0)
        check(peak > 0, f"{panel['title']!r} shows data (largest value {peak:.4g})")
    return results


def draw(dashboard, values, results, start, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    unit_w, unit_h = 0.8, 0.32
    fig = plt.figure(figsize=(24 * unit_w, rows * unit_h))
    title = f"{dashboard['title']}: " + ", ".join(f"{k}={v}" for k, v in values.items())
    fig.suptitle(title + " (queries evaluated by Prometheus, drawn by check_dashboard.py)",
                 fontsize=12)
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        top = 0.96  # the rest is the figure's title
        ax = fig.add_axes([g["x"] / 24 + 0.035, top * (1 - (g["y"] + g["h"]) / rows) + 0.04,
                           g["w"] / 24 - 0.05, top * g["h"] / rows - 0.085])
        ax.set_title(substitute(panel["title"], values), fontsize=10)
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        if panel["type"] == "heatmap":
            _, series = results[panel["id"]][0]
            series = sorted(series, key=lambda s: int(s[0]) if s[0].isdigit() else s[0])
            times = [t for t, _ in series[0][1]]
            grid = [[dict(points).get(t, math.nan) for t in times] for _, points in series]
            image = ax.imshow(grid, aspect="auto", origin="lower", cmap="Oranges",
                              interpolation="nearest",
                              extent=(0, times[-1] - start, -0.5, len(series) - 0.5))
            ax.set_yticks(range(len(series)), [name for name, _ in series], fontsize=7)
            ax.set_ylabel("expert", fontsize=8)
            fig.colorbar(image, ax=ax, label="tokens/s", pad=0.01)
        else:
            for _, series in results[panel["id"]]:
                for name, points in series:
                    ax.plot([t - start for t, _ in points], [v for _, v in points], label=name)
            ax.legend(fontsize=7, loc="upper left")
            ax.set_ylabel(unit, fontsize=8)
        ax.set_xlabel("seconds into the load", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=70)
    print(f"drew {len(dashboard['panels'])} panels into {path}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", type=pathlib.Path, default=ROOT / "target/debug")
    parser.add_argument("--prometheus", required=True, help="the prometheus binary")
    parser.add_argument("--png", type=pathlib.Path, help="where to draw the dashboard")
    args = parser.parse_args()
    dashboard = json.loads(DASHBOARD.read_text())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        targets = tmp / "targets.json"
        # Prompts shared in 32-token chunks: the default chunk (512) is longer than the tiny
        # model's context, so nothing would be cached.
        manifest = tmp / "tiny-ep.yaml"
        manifest.write_text(SAMPLE.read_text().replace(
            "  worker:\n",
            "  worker:\n    env:\n      - {name: DSD_CHUNKED_PREFILL_SIZE, value: \"32\"}\n", 1))
        run = RunLocal(args.bin_dir.resolve(), manifest, "--prometheus-targets", targets)
        prom = None
        try:
            http = run.wait_for(r"tiny-ep: http://(\S+) \(OpenAI API", timeout=300).group(1)
            listed = json.loads(targets.read_text())
            check(len(listed) == 4, f"run-local lists the router and three worker pods ({len(listed)})")
            prom = Prometheus(args.prometheus, targets, tmp)
            deadline = time.time() + 30
            while True:
                active = prom.api("targets")["activeTargets"]
                if len(active) == 4 and all(t["health"] == "up" for t in active):
                    break
                if time.time() > deadline:
                    raise SystemExit(f"FAILED: targets not all up: {json.dumps(active)[:2000]}")
                time.sleep(0.5)
            labels = sorted((t["labels"]["component"], t["labels"].get("pool", ""))
                            for t in active if t["labels"]["deployment"] == "tiny-ep")
            check(labels == [("router", ""), ("worker", "a"), ("worker", "a"), ("worker", "b")],
                  f"Prometheus scrapes every process, labelled by deployment, component, pool: {labels}")

            client = openai.OpenAI(base_url=f"http://{http}/v1", api_key="none", max_retries=0)
            start = time.time()
            errors = load(client, threads=4, seconds=LOAD_SECONDS)
            check(not errors, f"the load ran without a failed request ({errors[:3]})")
            time.sleep(3)  # the last scrapes
            end = time.time()

            values = resolve_variables(prom, dashboard)
            results = evaluate(prom, dashboard, values, start, end)
            if args.png:
                draw(dashboard, values, results, start, args.png)
        finally:
            if prom:
                prom.stop()
            run.proc.send_signal(signal.SIGINT)
            code = run.proc.wait(timeout=60)
        check(code == 0, f"run-local exits 0 on SIGINT ({code})")
        check(json.loads(targets.read_text()) == [], "run-local leaves the targets file empty")


if __name__ == "__main__":
    main()
