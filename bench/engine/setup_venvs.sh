#!/usr/bin/env bash
# Creates the two Python environments the engine benchmark uses (both under the git-ignored
# .tools/), skipping any that already works. Run from anywhere; takes ~10-15 min on 2 cores,
# nearly all of it compiling llama.cpp.
#
#   .tools/fixtures-venv   torch (CPU use), transformers, safetensors, numpy (+ tokenizers):
#                          makes the bench model, runs transformers, runs llama.cpp's converter
#   .tools/llamacpp-venv   llama-cpp-python compiled from source (CPU only, -DGGML_NATIVE=ON),
#                          plus gguf, cmake, ninja, scikit-build-core
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"

if ! .tools/fixtures-venv/bin/python -c "import torch, transformers, safetensors, numpy, tokenizers" 2>/dev/null; then
    python3 -m venv .tools/fixtures-venv
    .tools/fixtures-venv/bin/pip install torch transformers safetensors numpy
fi

if ! .tools/llamacpp-venv/bin/python -c "import llama_cpp" 2>/dev/null; then
    python3 -m venv .tools/llamacpp-venv
    .tools/llamacpp-venv/bin/pip install --upgrade pip
    .tools/llamacpp-venv/bin/pip install cmake ninja scikit-build-core gguf numpy
    start=$(date +%s)
    # --no-build-isolation: build with the cmake/ninja/scikit-build-core installed above.
    # nice: the machine is shared with Rust builds.
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_CURL=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=2 \
        nice -n 10 .tools/llamacpp-venv/bin/pip install -v --no-build-isolation llama-cpp-python
    echo "llama-cpp-python built in $(( $(date +%s) - start )) s"
fi
.tools/llamacpp-venv/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__); print(llama_cpp.llama_print_system_info().decode())"
