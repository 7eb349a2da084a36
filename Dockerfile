# The sidecar image: the asya-host binary, the stock plugins and the stock Python runtime.
#
#   docker build -t asya-host .
#   docker run --rm asya-host --help
#
# Runtime containers (the actor's Python image) can copy the runtime file from it:
#   COPY --from=asya-host /opt/asya/asya_runtime.py /opt/asya/asya_runtime.py

# --- build: host (release) and the stock plugins (wasm32-wasip2) -----------------------
# bookworm explicitly: the binary links against the glibc of the runtime stage below.
FROM rust:1.95-bookworm AS builder
RUN rustup target add wasm32-wasip2
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p asya-host \
 && cargo build --release --locked --manifest-path plugins/Cargo.toml --target wasm32-wasip2 \
      -p priority-router -p route-allowlist -p redis-streams \
 && mkdir -p /out/plugins \
 && cp target/release/asya-host /out/asya-host \
 && cp plugins/target/wasm32-wasip2/release/priority_router.wasm \
       plugins/target/wasm32-wasip2/release/route_allowlist.wasm \
       plugins/target/wasm32-wasip2/release/redis_streams.wasm \
       /out/plugins/

# --- runtime ----------------------------------------------------------------------------
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
