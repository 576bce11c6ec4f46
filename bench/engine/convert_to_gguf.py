#!/usr/bin/env python3
"""Converts the bench model to GGUF with llama.cpp's own convert_hf_to_gguf.py.

    .tools/fixtures-venv/bin/python bench/engine/convert_to_gguf.py MODEL_DIR --outtype f16 [--outfile F]

The converter is the one vendored in the llama-cpp-python sdist that the llama.cpp venv was
built from (vendor/llama.cpp/convert_hf_to_gguf.py + conversion/ + gguf-py/). It is looked for
under .tools/llamacpp-src/llama_cpp_python-*/; if absent, the sdist is fetched with
`.tools/llamacpp-venv/bin/pip download --no-deps --no-binary :all: --no-build-isolation
llama-cpp-python==<installed>` and unpacked there (--no-build-isolation, or pip would build cmake
from source just to read the sdist's metadata). Run it with a Python that has torch and
transformers (the fixtures venv).

One patch, and only one: llama.cpp identifies a BPE pre-tokenizer by hashing the ids the
tokenizer gives for a fixed test string, and knows only the hashes of published tokenizers. The
bench model's throwaway BPE has its own hash, so `get_vocab_base_pre` is made to answer
"deepseek-v3" (DeepSeek-V3's pre-tokenizer regexes). That affects text tokenisation only; the
benchmarks feed token ids.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SRC = os.path.join(ROOT, ".tools", "llamacpp-src")
LLAMA_PIP = os.path.join(ROOT, ".tools", "llamacpp-venv", "bin", "pip")
LLAMA_PY = os.path.join(ROOT, ".tools", "llamacpp-venv", "bin", "python")


def llama_cpp_dir() -> str:
    found = sorted(glob.glob(os.path.join(SRC, "llama_cpp_python-*", "vendor", "llama.cpp", "convert_hf_to_gguf.py")))
    if found:
        return os.path.dirname(found[-1])
    os.makedirs(SRC, exist_ok=True)
    tarballs = sorted(glob.glob(os.path.join(SRC, "llama_cpp_python-*.tar.gz")))
    if not tarballs:
        version = subprocess.run([LLAMA_PY, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run([LLAMA_PIP, "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
                        f"llama-cpp-python=={version}", "-d", SRC], check=True)
        tarballs = sorted(glob.glob(os.path.join(SRC, "llama_cpp_python-*.tar.gz")))
    with tarfile.open(tarballs[-1]) as tf:
        members = [m for m in tf.getmembers()
                   if "/vendor/llama.cpp/" in m.name
                   and any(k in m.name for k in ("convert_hf_to_gguf.py", "/conversion/", "/gguf-py/"))]
        tf.extractall(SRC, members=members, filter="data")
    return llama_cpp_dir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--outfile")
    ap.add_argument("--tokenizer-pre", default="deepseek-v3")
    args = ap.parse_args()
    d = llama_cpp_dir()
    sys.path.insert(0, d)
    sys.path.insert(1, os.path.join(d, "gguf-py"))
    import conversion.base as base  # noqa: E402
    import convert_hf_to_gguf  # noqa: E402

    pre = args.tokenizer_pre
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    outfile = args.outfile or os.path.join(args.model_dir, f"bench-small-{args.outtype}.gguf")
    sys.argv = ["convert_hf_to_gguf.py", args.model_dir, "--outtype", args.outtype, "--outfile", outfile]
    print(f"converter: {d}/convert_hf_to_gguf.py (tokenizer pre forced to {pre!r})", flush=True)
    convert_hf_to_gguf.main()
    print(f"wrote {outfile} ({os.path.getsize(outfile):,} bytes)")


if __name__ == "__main__":
    main()
