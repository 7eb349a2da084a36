# The sidecar image: the asya-host binary, the stock plugins and the stock Python runtime.
#
#   docker build -t asya-host .
#   docker run --rm asya-host --help
#
# Runtime containers (the actor's Python image) can copy the runtime file from it:
#   COPY --from=asya-host /opt/asya/asya_runtime.py /opt/asya/asya_runtime.py

# --- build: host (release) and the stock plugins (wasm32-wasip2) -----------------------
# The release binary is ~172 MB, almost all line-table debug info: the image gets it
# stripped (~30 MB; symbols kept, so backtraces still name functions) and the debug info
# stays in this stage as /out/asya-host.debug (named by the binary's .gnu_debuglink):
#   docker build --target builder -t asya-host-build .
#   docker run --rm asya-host-build cat /out/asya-host.debug > asya-host.debug
# bookworm explicitly: the binary links against the glibc of the runtime stage below.
FROM rust:1.95-bookworm AS builder
RUN rustup target add wasm32-wasip2
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p asya-host \
 && cargo build --release --locked --manifest-path plugins/Cargo.toml --target wasm32-wasip2 \
      -p priority-router -p route-allowlist -p redis-streams \
 && mkdir -p /out/plugins \
 && objcopy --only-keep-debug target/release/asya-host /out/asya-host.debug \
 && objcopy --strip-debug --add-gnu-debuglink=/out/asya-host.debug \
      target/release/asya-host /out/asya-host \
 && cp plugins/target/wasm32-wasip2/release/priority_router.wasm \
       plugins/target/wasm32-wasip2/release/route_allowlist.wasm \
       plugins/target/wasm32-wasip2/release/redis_streams.wasm \
       /out/plugins/

# --- runtime ----------------------------------------------------------------------------
# scripts/verify-image.sh rebuilds this stage without Docker (debootstrap + chroot) and runs
# the sidecar in it as uid 10001 on a read-only root: keep the two in step.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /home/asya asya \
 && mkdir -p /var/run/asya \
 && chown asya:asya /var/run/asya
COPY --from=builder /out/asya-host /usr/local/bin/asya-host
COPY --from=builder /out/plugins/ /opt/asya/plugins/
COPY sdk/python/asya_runtime.py /opt/asya/asya_runtime.py
# Compiled plugins are cached here, so a restart does not recompile them.
ENV ASYA_PLUGIN_CACHE_DIR=/home/asya/.cache/asya
USER 10001:10001
# Admin server (/metrics, /healthz, /readyz, /debug/inflight).
EXPOSE 8080
ENTRYPOINT ["asya-host"]
CMD ["sidecar"]
