# syntax=docker/dockerfile:1
#
# ragway: a multi-stage build into a slim runtime image.
#
#   docker build -t ragway .                                   # CPU, x86-64-v3 baseline
#   docker build -t ragway:cuda \
#     --build-arg BUILD_IMAGE=nvidia/cuda:12.4.1-devel-ubuntu22.04 \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#     --build-arg FEATURES=cuda --build-arg CUDA_COMPUTE_CAP=90 .
#
# CPU baseline: x86-64-v3 (AVX2, FMA, BMI2: Intel Haswell / AMD Zen 1 and later). AVX-512
# kernels are still chosen at run time where the CPU has them. For older CPUs build with
# `--build-arg RUSTFLAGS=` (plain x86-64), for one machine `-C target-cpu=native`.
# Models are not baked in: mount a folder prepared by `scripts/setup-models.sh` at /models.

ARG BUILD_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
ARG FEATURES=""
ARG RUSTFLAGS="-C target-cpu=x86-64-v3"
ARG CUDA_COMPUTE_CAP=""
# The CUDA images have no Rust: install a minimal toolchain there.
RUN if ! command -v cargo >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config && \
      curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PATH=/root/.cargo/bin:/usr/local/cargo/bin:$PATH
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cargo/registry \
    --mount=type=cache,target=/src/target \
    RUSTFLAGS="$RUSTFLAGS" CUDA_COMPUTE_CAP="$CUDA_COMPUTE_CAP" \
    cargo build --release --locked -p ragway-gateway --bin ragway ${FEATURES:+--features "$FEATURES"} && \
    cp target/release/ragway /usr/local/bin/ragway

FROM ${RUNTIME_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && \
    rm -rf /var/lib/apt/lists/* && \
    useradd --system --uid 10001 --home-dir /data ragway && mkdir -p /data /models && chown ragway /data
COPY --from=build /usr/local/bin/ragway /usr/local/bin/ragway
USER ragway
ENV RAGWAY_HOST=0.0.0.0 \
    RAGWAY_PORT=8080 \
    RAGWAY_MODELS_DIR=/models \
    RAGWAY_DATA_DIR=/data \
    HF_HUB_OFFLINE=1
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD curl -fsS http://127.0.0.1:8080/health || exit 1
# SIGTERM drains in-flight requests (up to 30 s) before exiting.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ragway"]
CMD ["serve"]
