#!/usr/bin/env bash
# GPU check: every kernel and the model step against the CPU path, serving from the GPU
# through the router against a CPU worker, then benchmarks at DeepSeek-V3 shapes, on one
# GPU, as one JSON report. Builds nothing: GPU machines may have no Rust toolchain, so it
# takes prebuilt release binaries (`cargo build --release -p deepseek-worker -p
# deepseek-router` elsewhere).
#
#   tests/gpu/run.sh [BIN_DIR] [REPORT]
#     BIN_DIR  where deepseek-worker and deepseek-router are (default target/release)
#     REPORT   the JSON report (default $OUT/gpu-report.json, else gpu-report.json)
#
# Kernels compile at start with the machine's NVRTC (CUDA 12 or 13) into DSD_KERNEL_CACHE;
# a machine without NVRTC can be given a cache filled elsewhere with
# `deepseek-worker kernels --arch sm_90a --cache DIR`.
set -euo pipefail
cd "$(dirname "$0")/../.."

bin_dir=${1:-target/release}
report=${2:-${OUT:+$OUT/}gpu-report.json}
worker="$bin_dir/deepseek-worker"
for bin in deepseek-worker deepseek-router; do
    [[ -x $bin_dir/$bin ]] || { echo "no $bin_dir/$bin: build it with cargo build --release -p $bin" >&2; exit 2; }
done

# cudarc asks the dynamic loader for libcublas.so and friends; CUDA 13 images name them
# .so.13 (NCCL .so.2). Give the newest of each an unversioned name on the library path.
libs=$(mktemp -d)
trap 'rm -rf "$libs"' EXIT
search=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu)
for site in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
    search+=("$site"/nvidia/*/lib "$site"/nvidia/cu13/lib "$site"/nvidia/nccl/lib)
done
for spec in cublas:1[32] cublasLt:1[32] nvrtc:1[32] nccl:2; do
    lib=${spec%%:*} version=${spec#*:}
    for dir in "${search[@]}"; do
        found=$(ls "$dir"/lib$lib.so.$version* 2>/dev/null | sort -r | head -1 || true)
        if [[ -n $found ]]; then
            ln -sf "$found" "$libs/lib$lib.so"
            export LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
            echo "lib$lib: $found"
            break
        fi
    done
done
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"

if [[ -z ${DSD_CUDA_INCLUDE:-} ]]; then
    for dir in /usr/local/cuda/include /usr/local/cuda/targets/x86_64-linux/include \
               $(python3 -c 'import site; print(" ".join(s + "/nvidia/cuda_runtime/include " + s + "/nvidia/cu13/include" for s in site.getsitepackages()))' 2>/dev/null); do
        if [[ -f $dir/cuda_bf16.h ]]; then export DSD_CUDA_INCLUDE=$dir; break; fi
    done
fi
echo "CUDA headers: ${DSD_CUDA_INCLUDE:-none found}"
export DSD_KERNEL_CACHE=${DSD_KERNEL_CACHE:-$(mktemp -d)}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
start=$(date +%s)
status=0
timeout 330 "$worker" gpu-check --device cuda:0 --fixtures tests/fixtures --bench --report "$report" >/dev/null || status=$?
echo "gpu-check exited $status after $(( $(date +%s) - start )) s; report: $report"
timeout 120 python3 tests/gpu/serve_check.py "$bin_dir" "$report" || { [[ $status == 0 ]] && status=1; }
if [[ -f $report ]]; then
    python3 - "$report" <<'PY' || cat "$report"
import json, sys
r = json.load(open(sys.argv[1]))
print(r["device"], r["architecture"], "|", r["compiler"])
for c in r["checks"]:
    print(("PASS" if c["passed"] else "FAIL"), c["name"], c.get("max_error", c.get("error")), c.get("detail", ""))
print("serve:", r.get("serve"))
print(json.dumps(r["benchmarks"], indent=1))
PY
fi
exit $status
