#!/usr/bin/env python3
"""Prefill and decode tokens/s of llama.cpp, transformers and deepseek-worker on one checkpoint.

    .tools/fixtures-venv/bin/python bench/engine/bench_engines.py [--model DIR] [--engines ...]

Same model (bench-small, see make_bench_model.py), same prompt (--prompt-len token ids drawn
from a fixed seed, bos first), --gen-len greedy tokens, batch 1, --threads threads for every
engine. Each engine is warmed up with one full run, then timed --runs times; the median is
reported. Prefill = one forward pass over the whole prompt (its logits give the first generated
token); decode = the remaining gen-len - 1 single-token forward passes, tokens/s = those steps /
their summed time.

  llama.cpp     llama-cpp-python (.tools/llamacpp-venv) on GGUF f16 and bf16 files made by
                convert_to_gguf.py: Llama(n_threads=n_threads_batch=threads, n_batch=n_ubatch=
                n_ctx=512, f32 KV cache, flash_attn off); prefill = Llama.eval(prompt),
                decode = Llama.eval([token]) + argmax of llama_get_logits_ith(-1) per step.
  transformers  DeepseekV3ForCausalLM.from_pretrained (.tools/fixtures-venv), CPU,
                torch.set_num_threads(threads), attn_implementation="eager", experts
                implementation = transformers' default (grouped_mm) unless --hf-experts;
                float32 and bfloat16; prefill = model(prompt, logits_to_keep=1), decode =
                model(token, past_key_values) per step, torch.inference_mode().
  ours          $WORKER_BIN generate --model DIR --prompt-ids ... --max-new-tokens N
                --threads T (default /work/main/target/release/deepseek-worker); its own
                timing.prefill_tokens_per_s / timing.decode_tokens_per_s / timing.load_s,
                and its peak resident memory (ru_maxrss from os.wait4) as peak_rss_mib.
  ours-fp8      the same on the FP8 variant of the model (--fp8-model, default
                .tools/bench-model/bench-small-fp8, make_bench_model.py --fp8): not in the default
                --engines; name it (--engines ours,ours-fp8). When both ran, ratios["ours-fp8/ours"]
                gives its prefill, decode and peak-RSS ratios to ours.
  ours-coded    ours with --cpu-decode-weights coded (the bf16 weights recoded at load in a
                lossless 12 bits a weight; needs AVX-512 VBMI): not in the default --engines;
                ratios as ours', and against ours and ours-fp8.
  ours-fp8-coded  ours-fp8 with --cpu-decode-weights coded (the FP8 checkpoint's bf16 tensors,
                lm_head among them, coded): not in the default --engines; ratios against ours
                and ours-coded.

Also: this machine's memory read bandwidth (numpy float32 sum over 1 GiB, one thread, and
torch.sum over the same array with `threads` threads; median of 7 passes each; the larger is used) and the decode bound
= bandwidth / weight bytes read per decoded token (active parameters, bf16 and f32), greedy
token agreement of every engine with transformers float32, and the max |logit difference| of
the prompt's last position against transformers float32.

Writes bench/engine/results.json and prints a Markdown table. Engines run in subprocesses, one
at a time, each under its own venv's Python (--llama-python, --hf-python).

The machine is shared (2 cores): before each engine the script waits (--quiet-wait s at most)
until no compiler (rustc, cargo, rust-lld, cc1, ...) runs, and while the engine runs it samples
/proc twice a second; each engine's `contended_fraction` is the share of samples in which a
compiler ran alongside it, and `foreign_cpu_share` the CPU time all other processes used
meanwhile (from /proc/stat less this script's own and its children's rusage) as a share of
the machine (table column "compiler running / others' CPU"). A disturbed measurement is
repeated (--retries, default 2) and the least disturbed attempt kept; figures with a non-zero
share are low, by up to 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_MODEL = os.path.join(ROOT, ".tools", "bench-model", "bench-small")
DEFAULT_FP8_MODEL = os.path.join(ROOT, ".tools", "bench-model", "bench-small-fp8")
LLAMA_PY = os.path.join(ROOT, ".tools", "llamacpp-venv", "bin", "python")
HF_PY = os.path.join(ROOT, ".tools", "fixtures-venv", "bin", "python")
WORKER_BIN = os.environ.get("WORKER_BIN", os.path.join(ROOT, "target", "release", "deepseek-worker"))
PROMPT_SEED = 7


def make_prompt(vocab: int, n: int, bos: int) -> list[int]:
    import random

    rng = random.Random(PROMPT_SEED)
    return [bos] + [rng.randrange(16, vocab) for _ in range(n - 1)]  # skip ids of specials


def summarize(runs: list[dict]) -> dict:
    out = {"runs": runs}
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_s", "decode_s", "load_s", "peak_rss_mib"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        if vals:
            out[key] = statistics.median(vals)
    return out


# ------------------------------------------------------------------------------------------
# Workers (run in a subprocess under the engine's venv); each prints one JSON line at the end
# ------------------------------------------------------------------------------------------


def timings(prompt_len: int, prefill_s: float, steps: list, tokens: list) -> dict:
    """One run's figures: prefill time, per-step decode times, greedy tokens."""
    decode_s = sum(steps)
    return {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_tokens_per_s": prompt_len / prefill_s,
        "decode_tokens_per_s": len(steps) / decode_s if steps else None,
        "tokens": tokens,
    }


def repeat(args, one_run, per_run_lists=("tokens",)) -> tuple[dict, list]:
    """A warm-up, then `args.runs` runs of `one_run` (→ (figures, first logits)); saves the
    last run's first logits when asked; returns the summary and the runs."""
    import numpy as np

    one_run()
    runs = []
    first_logits = None
    for _ in range(args.runs):
        r, first_logits = one_run()
        runs.append(r)
    if args.logits_out:
        np.save(args.logits_out, first_logits.astype(np.float32))
    out = summarize([{k: v for k, v in r.items() if k not in per_run_lists} for r in runs])
    out.update({"tokens": runs[-1]["tokens"],
                "deterministic": all(r["tokens"] == runs[0]["tokens"] for r in runs)})
    return out, runs


def worker_bandwidth(args) -> dict:
    import numpy as np

    n = 1 << 28  # 2^28 float32 = 1 GiB
    a = np.ones(n, dtype=np.float32)
    a.sum()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    res = {"array_bytes": a.nbytes, "numpy_sum_1thread_gbs": a.nbytes / statistics.median(times) / 1e9}
    try:
        import torch

        torch.set_num_threads(args.threads)
        ta = torch.from_numpy(a)
        ta.sum()
        times = []
        for _ in range(7):
            t = time.perf_counter()
            ta.sum()
            times.append(time.perf_counter() - t)
        res[f"torch_sum_{args.threads}threads_gbs"] = a.nbytes / statistics.median(times) / 1e9
    except ImportError:
        pass
    res["read_gbs"] = max(v for k, v in res.items() if k.endswith("_gbs"))
    return res


def worker_llamacpp(args) -> dict:
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    prompt = json.loads(args.prompt_ids)
    t0 = time.perf_counter()
    llm = Llama(model_path=args.gguf, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=args.threads,
                n_threads_batch=args.threads, type_k=llama_cpp.GGML_TYPE_F32,
                type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, logits_all=False, verbose=False,
                use_mmap=True)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_logits():
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

    def one_run():
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        lg = last_logits()
        prefill_s = time.perf_counter() - t
        first = lg
        toks = [int(lg.argmax())]
        steps = []
        for _ in range(args.gen_len - 1):
            t = time.perf_counter()
            llm.eval([toks[-1]])
            tok = int(last_logits().argmax())
            steps.append(time.perf_counter() - t)
            toks.append(tok)
        return timings(len(prompt), prefill_s, steps, toks), first

    out, _ = repeat(args, one_run)
    out.update({"load_s": load_s,
                "llama_cpp_python": llama_cpp.__version__,
                "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()})
    return out


def worker_transformers(args) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    kw = {} if args.hf_experts == "default" else {"experts_implementation": args.hf_experts}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="eager", **kw)
    model.eval()
    load_s = time.perf_counter() - t0
    prompt = json.loads(args.prompt_ids)
    ids = torch.tensor([prompt])

    @torch.inference_mode()
    def one_run():
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        lg = out.logits[0, -1].float()
        tok = int(lg.argmax())
        prefill_s = time.perf_counter() - t
        first = lg.numpy().copy()
        cache = out.past_key_values
        toks = [tok]
        gaps = [lg.topk(2)[0]]
        steps = []
        for _ in range(args.gen_len - 1):
            t = time.perf_counter()
            out = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
            steps.append(time.perf_counter() - t)
            toks.append(tok)
            gaps.append(out.logits[0, -1].float().topk(2)[0])
        figures = timings(len(prompt), prefill_s, steps, toks)
        # top-1 minus top-2 logit of each greedy step: how close each choice was
        figures["top1_top2_gaps"] = [round(float(g[0] - g[1]), 5) for g in gaps]
        return figures, first

    out, runs = repeat(args, one_run, ("tokens", "top1_top2_gaps"))
    out.update({"load_s": load_s, "top1_top2_gaps": runs[-1]["top1_top2_gaps"],
                "transformers": transformers.__version__, "torch": torch.__version__,
                "experts_implementation": model.config._experts_implementation,
                "attn_implementation": model.config._attn_implementation})
    return out


# ------------------------------------------------------------------------------------------
# Orchestrator
# ------------------------------------------------------------------------------------------


# Processes that mean someone else is compiling on this (shared, 2-core) machine.
COMPETITORS = {"rustc", "cargo", "rust-lld", "ld", "cc1", "cc1plus", "cc", "c++", "ninja", "make"}


def competitors() -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue
            if name in COMPETITORS:
                found.append(name)
    return found


def wait_quiet(max_wait: float) -> float:
    """Waits (up to max_wait s) until no compiler runs; returns the seconds waited."""
    t = time.time()
    while competitors() and time.time() - t < max_wait:
        time.sleep(2)
    return time.time() - t


class ContentionMonitor:
    """Samples /proc twice a second while an engine runs: the share of samples in which a
    compiler (someone else's cargo build) was running too."""

    def __init__(self):
        import threading

        self.samples = 0
        self.busy = 0
        self.names: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            c = competitors()
            self.samples += 1
            if c:
                self.busy += 1
                self.names.update(c)
            self._stop.wait(0.5)

    @staticmethod
    def _cpu():
        import resource

        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / hz  # user nice system irq softirq
        steal = v[7] / hz if len(v) > 7 else 0.0
        own = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for a in ("ru_utime", "ru_stime"))
        return time.time(), busy, steal, own

    def __enter__(self):
        self._t0 = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._t1 = self._cpu()

    def report(self) -> dict:
        (w0, b0, s0, o0), (w1, b1, s1, o1) = self._t0, self._t1
        cap = max(w1 - w0, 1e-9) * (os.cpu_count() or 1)
        return {"contended_fraction": round(self.busy / max(self.samples, 1), 3),
                "competitors_seen": sorted(self.names),
                # CPU time that other processes (not this script and its engine) used while the
                # engine ran, as a share of the machine's capacity; and the hypervisor's steal
                "foreign_cpu_share": round(max(0.0, (b1 - b0) - (o1 - o0)) / cap, 3),
                "steal_share": round((s1 - s0) / cap, 3)}


def contended(res: dict) -> bool:
    return bool(res.get("contended_fraction")) or res.get("foreign_cpu_share", 0) > 0.05


def with_retries(args, label: str, once) -> dict:
    """Runs a measurement; reruns it (up to --retries times) while someone else's work shared
    the CPU with it, and keeps the least disturbed attempt."""
    best = None
    for attempt in range(args.retries + 1):
        waited = wait_quiet(args.quiet_wait)
        res = once()
        if "error" in res or "skipped" in res:
            return res
        res.update(waited_for_quiet_s=round(waited, 1), attempts=attempt + 1)
        share = res.get("foreign_cpu_share", 0) + res.get("contended_fraction", 0)
        if best is None or share < best[0]:
            best = (share, res)
        if not contended(res):
            break
        print(f"   {label}: a compiler ran during {100 * res['contended_fraction']:.0f}% of this measurement; "
              f"other processes used {100 * res['foreign_cpu_share']:.0f}% of the machine's CPU"
              + (" - measuring again" if attempt < args.retries else ""), flush=True)
    return best[1]


def run_worker(python: str, name: str, extra: list[str], args, prompt: list[int]) -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", name, "--model", args.model,
           "--threads", str(args.threads), "--runs", str(args.runs), "--gen-len", str(args.gen_len),
           "--prompt-ids", json.dumps(prompt), *extra]
    print(f"== {name} {' '.join(extra)}", flush=True)

    def once() -> dict:
        t = time.time()
        with ContentionMonitor() as mon:
            p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr[-4000:], file=sys.stderr)
            return {"error": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}"}
        res = json.loads(p.stdout.strip().splitlines()[-1])
        res["wall_s"] = time.time() - t
        res.update(mon.report())
        if "decode_tokens_per_s" in res:
            print(f"   prefill {res['prefill_tokens_per_s']:.1f} tok/s, decode "
                  f"{res['decode_tokens_per_s']:.2f} tok/s ({res['wall_s']:.0f} s)", flush=True)
        return res

    return with_retries(args, name, once)


def run_peak_rss(cmd: list[str]) -> tuple[int, str, str, float]:
    """Runs cmd to completion; returns (exit code, stdout, stderr, peak resident memory in MiB:
    the child's ru_maxrss from os.wait4, KiB on Linux)."""
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        fo.seek(0)
        fe.seek(0)
        return (p.returncode, fo.read().decode(errors="replace"), fe.read().decode(errors="replace"),
                ru.ru_maxrss / 1024)


def run_ours(args, prompt: list[int], logits_npy: str, model: str | None = None, label: str = "ours",
             extra: tuple = ()) -> dict:
    """$WORKER_BIN generate on `model` (default --model) with flags `extra`, reported as engine `label`."""
    model = model or args.model
    if not (os.path.isfile(WORKER_BIN) and os.access(WORKER_BIN, os.X_OK)):
        msg = f"skipped: {WORKER_BIN} does not exist (build it with cargo build --release, or set WORKER_BIN)"
        print(f"== {label}: {msg}", flush=True)
        return {"skipped": msg}
    if not os.path.exists(os.path.join(model, "config.json")):
        msg = f"skipped: {model} has no checkpoint (make_bench_model.py{' --fp8' if 'fp8' in label else ''})"
        print(f"== {label}: {msg}", flush=True)
        return {"skipped": msg}
    cmd = [WORKER_BIN, "generate", "--model", model, "--prompt-ids", ",".join(map(str, prompt)), *extra,
           "--max-new-tokens", str(args.gen_len), "--threads", str(args.threads)]
    print(f"== {label}: {' '.join(cmd[:4])} --prompt-ids <{len(prompt)} ids> {' '.join(cmd[6:])}", flush=True)

    def once() -> dict:
        runs = []
        with ContentionMonitor() as mon:
            for i in range(args.runs + 1):  # the first is the warm-up
                t = time.time()
                rc, stdout, stderr, rss = run_peak_rss(cmd)
                wall = time.time() - t
                if rc != 0:
                    return {"error": f"exit {rc}: {stderr.strip()[-2000:]}"}
                doc = json.loads(stdout.strip().splitlines()[-1])
                tm = doc["timing"]
                r = {"prefill_tokens_per_s": tm["prefill_tokens_per_s"],
                     "decode_tokens_per_s": tm["decode_tokens_per_s"],
                     "load_s": tm.get("load_s"), "wall_s": wall, "peak_rss_mib": rss, "tokens": doc["tokens"]}
                if i > 0:
                    runs.append(r)
        out = summarize([{k: v for k, v in r.items() if k != "tokens"} for r in runs])
        out.update(mon.report())
        out.update({"tokens": runs[-1]["tokens"], "binary": WORKER_BIN, "model_dir": model,
                    "deterministic": all(r["tokens"] == runs[0]["tokens"] for r in runs)})
        if len(out["tokens"]) < args.gen_len:
            out["note"] = f"stopped after {len(out['tokens'])} tokens (eos)"
        print(f"   prefill {out['prefill_tokens_per_s']:.1f} tok/s, decode {out['decode_tokens_per_s']:.2f} tok/s, "
              f"peak RSS {out['peak_rss_mib']:.0f} MiB", flush=True)
        return out

    out = with_retries(args, label, once)
    if "error" in out:
        return out
    # one more, untimed run for the correctness check: the last prompt position's logits
    with tempfile.TemporaryDirectory() as td:
        lj = os.path.join(td, "logits.json")
        p = subprocess.run(cmd[:-4] + ["--max-new-tokens", "1", "--threads", str(args.threads), "--logits-out", lj],
                           capture_output=True, text=True)
        if p.returncode == 0 and os.path.exists(lj):
            import numpy as np

            doc = json.load(open(lj))
            np.save(logits_npy, np.asarray(doc["prompt_logits"][-1], dtype=np.float32))
        else:
            out["logits_note"] = f"--logits-out run failed: {p.stderr.strip()[-500:]}"
    return out


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "nproc": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L2 cache", "L3 cache"):
                info[k.strip()] = v.strip()
        info["avx512_bf16"] = "avx512_bf16" in out
    except FileNotFoundError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["MemTotal"] = f.readline().split(":")[1].strip()
    except OSError:
        pass
    return info


def agreement(ref: list[int], toks: list[int], n: int) -> dict:
    k = min(n, len(ref), len(toks))
    first_diff = next((i for i in range(min(len(ref), len(toks))) if ref[i] != toks[i]), None)
    return {f"first_{n}_match": ref[:k] == toks[:k] and k == n,
            "matching_prefix": first_diff if first_diff is not None else min(len(ref), len(toks))}


def fmt(x, nd=1):
    return "–" if x is None else f"{x:.{nd}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--fp8-model", default=DEFAULT_FP8_MODEL,
                    help="the FP8 checkpoint for engine ours-fp8 (make_bench_model.py --fp8)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--engines", default="llamacpp,transformers,ours",
                    help="any of llamacpp, transformers, ours, ours-coded, ours-fp8, ours-fp8-coded "
                         "(comma-separated)")
    ap.add_argument("--gguf-types", default="f16,bf16,f32", help="GGUF files bench-small-<type>.gguf in --model")
    ap.add_argument("--hf-dtypes", default="float32,bfloat16")
    ap.add_argument("--hf-experts", default="default", help="transformers experts_implementation")
    ap.add_argument("--llama-python", default=LLAMA_PY)
    ap.add_argument("--hf-python", default=HF_PY)
    ap.add_argument("--out", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--retries", type=int, default=2,
                    help="measure an engine again (at most this often) when other processes shared the CPU")
    ap.add_argument("--update", action="store_true",
                    help="keep the other engines' figures from an existing --out (same setup), replace these")
    ap.add_argument("--quiet-wait", type=float, default=180,
                    help="before each engine, wait up to this many seconds for running compilers to finish")
    # worker mode
    ap.add_argument("--worker", choices=["bandwidth", "llamacpp", "transformers"])
    ap.add_argument("--prompt-ids")
    ap.add_argument("--gguf")
    ap.add_argument("--dtype")
    ap.add_argument("--logits-out")
    args = ap.parse_args()
    args.model = os.path.abspath(args.model)
    args.fp8_model = os.path.abspath(args.fp8_model)

    if args.worker:
        fn = {"bandwidth": worker_bandwidth, "llamacpp": worker_llamacpp, "transformers": worker_transformers}
        print(json.dumps(fn[args.worker](args)))
        return

    import numpy as np

    cfg = json.load(open(os.path.join(args.model, "config.json")))
    params = json.load(open(os.path.join(args.model, "bench_params.json")))
    prompt = make_prompt(cfg["vocab_size"], args.prompt_len, cfg["bos_token_id"])
    engines = args.engines.split(",")
    fp8_params_file = os.path.join(args.fp8_model, "bench_params.json")
    fp8_params = json.load(open(fp8_params_file)) if os.path.exists(fp8_params_file) else {}
    if "fp8_bytes_per_token" in fp8_params:
        params.setdefault("fp8_bytes_per_token", fp8_params["fp8_bytes_per_token"])
    # last prompt position's logits, per engine, kept beside the model (out of git) for --update
    ldir = os.path.join(args.model, "bench-logits", os.path.splitext(os.path.basename(args.out))[0])
    os.makedirs(ldir, exist_ok=True)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(),
        "model": {"dir": args.model, "total_params": params["total_params"],
                  "active_params_per_token": params["active_params_per_token"],
                  "bf16_bytes_per_token": params["bf16_bytes_per_token"],
                  "f32_bytes_per_token": params["f32_bytes_per_token"],
                  **({"fp8_bytes_per_token": params["fp8_bytes_per_token"], "fp8_dir": args.fp8_model}
                     if "fp8_bytes_per_token" in params else {}),
                  **{k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "n_routed_experts",
                                         "num_experts_per_tok", "n_group", "topk_group", "vocab_size")}},
        "setup": {"prompt_len": args.prompt_len, "gen_len": args.gen_len, "threads": args.threads,
                  "runs": args.runs, "batch": 1, "greedy": True, "prompt_seed": PROMPT_SEED,
                  "prompt_ids": prompt},
        "engines": {},
        "loadavg_start": os.getloadavg(),
    }
    if args.update and os.path.exists(args.out):
        prev = json.load(open(args.out))
        if prev.get("setup") != results["setup"]:
            sys.exit(f"--update: {args.out} was measured with another setup; run without --update")
        results["engines"] = prev["engines"]
        results["updated_from"] = prev.get("date")

    bw = run_worker(args.hf_python, "bandwidth", [], args, prompt)
    results["bandwidth"] = bw
    if "read_gbs" in bw:
        g = bw["read_gbs"] * 1e9
        results["decode_bound_tokens_per_s"] = {"bf16": g / params["bf16_bytes_per_token"],
                                                "f32": g / params["f32_bytes_per_token"]}
        if "fp8_bytes_per_token" in params:
            results["decode_bound_tokens_per_s"]["fp8"] = g / params["fp8_bytes_per_token"]
        print(f"   read bandwidth {bw['read_gbs']:.1f} GB/s -> decode bound bf16 "
              f"{results['decode_bound_tokens_per_s']['bf16']:.1f} tok/s, f32 "
              f"{results['decode_bound_tokens_per_s']['f32']:.1f} tok/s"
              + (f", fp8 {results['decode_bound_tokens_per_s']['fp8']:.1f} tok/s"
                 if "fp8" in results["decode_bound_tokens_per_s"] else ""), flush=True)

    logits = {}
    if "transformers" in engines:
        for dt in args.hf_dtypes.split(","):
            lo = os.path.join(ldir, f"transformers-{dt}.npy")
            r = run_worker(args.hf_python, "transformers",
                           ["--dtype", dt, "--hf-experts", args.hf_experts, "--logits-out", lo], args, prompt)
            results["engines"][f"transformers-{dt}"] = r
    if "llamacpp" in engines:
        if not os.path.exists(args.llama_python):
            results["engines"]["llamacpp"] = {"skipped": f"{args.llama_python} missing"}
        for gt in args.gguf_types.split(","):
            path = os.path.join(args.model, f"bench-small-{gt}.gguf")
            if not os.path.exists(path):
                results["engines"][f"llamacpp-{gt}"] = {"skipped": f"{path} missing (convert_to_gguf.py)"}
                continue
            lo = os.path.join(ldir, f"llamacpp-{gt}.npy")
            r = run_worker(args.llama_python, "llamacpp", ["--gguf", path, "--logits-out", lo], args, prompt)
            results["engines"][f"llamacpp-{gt}"] = r
    coded = ("--cpu-decode-weights", "coded")
    for name, model_dir, extra in (("ours", args.model, ()), ("ours-coded", args.model, coded),
                                   ("ours-fp8", args.fp8_model, ()),
                                   ("ours-fp8-coded", args.fp8_model, coded)):
        if name not in engines:
            continue
        results["engines"][name] = run_ours(args, prompt, os.path.join(ldir, f"{name}.npy"), model_dir, name, extra)
        if os.path.exists(WORKER_BIN):
            results["engines"][name]["binary_mtime"] = time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(WORKER_BIN)))
            git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout.strip()
            results["engines"][name]["git_head"] = git("log", "-1", "--format=%h %ci %s")
            results["engines"][name]["worker_src_uncommitted_changes"] = bool(
                git("status", "--porcelain", "--", "worker", "Cargo.toml", "Cargo.lock"))
    for name, r in results["engines"].items():
        r.setdefault("measured_at", results["date"])
        f = os.path.join(ldir, f"{name}.npy")
        if "tokens" in r and os.path.exists(f):
            logits[name] = np.load(f)

    # correctness against transformers float32
    ref_name = "transformers-float32"
    ref = results["engines"].get(ref_name, {}).get("tokens")
    if ref is not None:
        for name, r in results["engines"].items():
            if r.get("tokens") is not None:
                r["agreement_vs_" + ref_name] = agreement(ref, r["tokens"], 8)
                if name in logits and ref_name in logits:
                    r["last_prompt_logits_max_abs_diff_vs_" + ref_name] = float(
                        np.abs(logits[name] - logits[ref_name]).max())
        if cfg["eos_token_id"] in ref:
            results["note_eos"] = "transformers' greedy tokens contain eos; 'ours' stops there"
    # ours-fp8 runs other weights (the FP8-rounded master weights): compare it with ours too
    fp8r, oursr = results["engines"].get("ours-fp8", {}), results["engines"].get("ours", {})
    if fp8r.get("tokens") is not None and oursr.get("tokens") is not None:
        fp8r["agreement_vs_ours"] = agreement(oursr["tokens"], fp8r["tokens"], 8)
        if "ours-fp8" in logits and "ours" in logits:
            fp8r["last_prompt_logits_max_abs_diff_vs_ours"] = float(np.abs(logits["ours-fp8"] - logits["ours"]).max())
    # a coded run reads the same weights as its stored twin: the same logits, bit for bit
    for coded_name, twin in (("ours-coded", "ours"), ("ours-fp8-coded", "ours-fp8")):
        if coded_name in logits and twin in logits:
            results["engines"][coded_name]["same_logits_as_" + twin] = bool(
                np.array_equal(logits[coded_name], logits[twin]))

    # ratios
    def ratio(a: dict, b: dict) -> dict:
        out = {"prefill": a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"],
               "decode": a["decode_tokens_per_s"] / b["decode_tokens_per_s"]}
        if a.get("peak_rss_mib") and b.get("peak_rss_mib"):
            out["peak_rss"] = a["peak_rss_mib"] / b["peak_rss_mib"]
        return out

    measured = {name: r for name, r in results["engines"].items() if "decode_tokens_per_s" in r}
    ratios = {}
    for ours in ("ours", "ours-coded"):
        for name, r in measured.items():
            if ours in measured and not name.startswith("ours"):
                ratios[f"{ours}/{name}"] = ratio(measured[ours], r)
    for a, b in (("ours-coded", "ours"), ("ours-fp8", "ours"), ("ours-fp8", "ours-coded"),
                 ("ours-fp8-coded", "ours"), ("ours-fp8-coded", "ours-coded")):
        if a in measured and b in measured:
            ratios[f"{a}/{b}"] = ratio(measured[a], measured[b])
    results["ratios"] = ratios

    results["loadavg_end"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")

    # Markdown
    bound = results.get("decode_bound_tokens_per_s", {})
    lines = [f"bench-small: {params['total_params'] / 1e6:.0f} M params, {params['active_params_per_token'] / 1e6:.1f} M active "
             f"({params['bf16_bytes_per_token'] / 1e6:.0f} MB/token bf16); prompt {args.prompt_len}, "
             f"{args.gen_len} greedy tokens, {args.threads} threads, median of {args.runs} runs; "
             f"{results['machine'].get('Model name', '?')}, {results['machine'].get('nproc')} cores",
             "",
             "| engine | weights | prefill tok/s | decode tok/s | decode / bound | first 8 tokens = HF f32 | "
             "matching prefix (of {}) | last-prompt logits max abs diff vs HF f32 | load s | compiler running / others' CPU |".format(args.gen_len),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["engines"].items():
        if "skipped" in r or "error" in r:
            lines.append(f"| {name} | | {r.get('skipped') or r.get('error')} | | | | | | | |")
            continue
        wt = ("f32" if name.endswith(("float32", "-f32")) else
              "f16" if name.endswith("-f16") else "fp8" if "fp8" in name else "bf16")
        b = bound.get(wt if wt in ("f32", "fp8") else "bf16")
        ag = r.get("agreement_vs_" + ref_name, {})
        ld = r.get("last_prompt_logits_max_abs_diff_vs_" + ref_name)
        lines.append(f"| {name} | {wt} | {fmt(r.get('prefill_tokens_per_s'))} | {fmt(r.get('decode_tokens_per_s'), 2)} | "
                     f"{fmt(r['decode_tokens_per_s'] / b if b and r.get('decode_tokens_per_s') else None, 2)} | "
                     f"{ag.get('first_8_match', '–')} | {ag.get('matching_prefix', '–')} | "
                     f"{'–' if ld is None else f'{ld:.2e}'} | {fmt(r.get('load_s'), 2)} | "
                     f"{100 * r.get('contended_fraction', 0):.0f}% / {100 * r.get('foreign_cpu_share', 0):.0f}% |")
    lines.append("")
    if bw.get("read_gbs"):
        lines.append(f"Memory read bandwidth: {bw['read_gbs']:.1f} GB/s ("
                     + ", ".join(f"{k} {v:.1f}" for k, v in bw.items() if k.endswith("_gbs") and k != "read_gbs")
                     + f"); decode bound: bf16 {bound['bf16']:.1f} tok/s, f32 {bound['f32']:.1f} tok/s"
                     + (f", fp8 {bound['fp8']:.1f} tok/s" if "fp8" in bound else ""))
    rss = [f"{name} {r['peak_rss_mib']:.0f} MiB" for name, r in results["engines"].items() if r.get("peak_rss_mib")]
    if rss:
        lines.append("peak RSS: " + ", ".join(rss))
    for k, v in ratios.items():
        lines.append(f"{k}: prefill x{v['prefill']:.2f}, decode x{v['decode']:.2f}"
                     + (f", peak RSS x{v['peak_rss']:.2f}" if "peak_rss" in v else ""))
    lines.append("load average (1/5/15 min) at start %s, at end %s" % (
        "/".join(f"{x:.2f}" for x in results["loadavg_start"]), "/".join(f"{x:.2f}" for x in results["loadavg_end"])))
    print("\n".join(lines))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
