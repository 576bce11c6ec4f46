# syntax=docker/dockerfile:1
#
# One multi-stage build for the three images; pick one with --target:
#
#   docker build --target operator -t ghcr.io/deepseek-operator/deepseek-operator:0.1.0 .
#   docker build --target router   -t ghcr.io/deepseek-operator/deepseek-router:0.1.0 .
#   docker build --target worker   -t ghcr.io/deepseek-operator/deepseek-worker:0.1.0 .
#
# All images run as uid/gid 65532 (non-root) with the binary as the entrypoint.

# ---------------------------------------------------------------------------------------
# Builder: the whole workspace, all three binaries in one cargo invocation.
# ---------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY operator operator
COPY router router
COPY worker worker
# Registry and target dir are BuildKit cache mounts, so the binaries are copied out of
# target/ inside the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p deepseek-operator -p deepseek-router -p deepseek-worker \
 && mkdir -p /out \
 && cp target/release/deepseek-operator target/release/deepseek-router target/release/deepseek-worker /out/

# ---------------------------------------------------------------------------------------
# Kernels: every CUDA kernel compiled for A100 (sm_80) and Hopper (sm_90a) with NVRTC from
# PyPI (no CUDA toolkit, no GPU), shipped in the worker image so a GPU node compiles nothing;
# the CUDA headers go along for the NVRTC fallback on other GPUs. Versions as in .ci/run.
# ---------------------------------------------------------------------------------------
FROM builder AS kernels
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/cuda-venv \
 && /opt/cuda-venv/bin/pip install --no-cache-dir "nvidia-cuda-nvrtc-cu12==12.9.86" \
      "nvidia-cuda-runtime-cu12==12.9.79" \
 && site="$(/opt/cuda-venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && LD_LIBRARY_PATH="$site/nvidia/cuda_nvrtc/lib" DSD_CUDA_INCLUDE="$site/nvidia/cuda_runtime/include" \
      /out/deepseek-worker kernels --arch sm_80 --arch sm_90a --cache /out/kernels \
 && cp -r "$site/nvidia/cuda_runtime/include" /out/cuda-include

# ---------------------------------------------------------------------------------------
# Router: gRPC/OpenAI-compatible front end. Distroless (glibc, libgcc), no shell.
# ---------------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot AS router
LABEL org.opencontainers.image.title="deepseek-router" \
      org.opencontainers.image.description="Router in front of DeepSeek expert-parallel worker groups" \
      org.opencontainers.image.source="https://github.com/deepseek-operator/deepseek-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/deepseek-router /usr/local/bin/deepseek-router
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/deepseek-router"]

# ---------------------------------------------------------------------------------------
# Worker: runs on GPU nodes, so it starts from the CUDA runtime (Ubuntu 24.04, glibc 2.39,
# newer than the builder's 2.36). The image has no uid 65532; create it.
# ---------------------------------------------------------------------------------------
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS worker
LABEL org.opencontainers.image.title="deepseek-worker" \
      org.opencontainers.image.description="Expert-parallel DeepSeek MoE worker (CUDA runtime)" \
      org.opencontainers.image.source="https://github.com/deepseek-operator/deepseek-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin nonroot
COPY --from=builder /out/deepseek-worker /usr/local/bin/deepseek-worker
COPY --from=kernels /out/kernels /usr/local/share/deepseek-worker/kernels
COPY --from=kernels /out/cuda-include /usr/local/share/deepseek-worker/cuda-include
# Chat templates a DeepSeekDeployment can name with DSD_CHAT_TEMPLATE in spec.env (tools).
COPY deploy/chat-templates /usr/local/share/deepseek-worker/chat-templates
# Read-only shipped cubins; what a GPU needs beyond them compiles with the runtime's NVRTC
# into DSD_KERNEL_CACHE, which the operator points at the pod's writable /tmp.
ENV DSD_SHIPPED_KERNELS=/usr/local/share/deepseek-worker/kernels \
    DSD_CUDA_INCLUDE=/usr/local/share/deepseek-worker/cuda-include
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/deepseek-worker"]

# ---------------------------------------------------------------------------------------
# Operator (last, so a plain `docker build .` produces it).
# ---------------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot AS operator
LABEL org.opencontainers.image.title="deepseek-operator" \
      org.opencontainers.image.description="Kubernetes operator for DeepSeek mixture-of-experts serving" \
      org.opencontainers.image.source="https://github.com/deepseek-operator/deepseek-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/deepseek-operator /usr/local/bin/deepseek-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/deepseek-operator"]
