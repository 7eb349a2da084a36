#!/usr/bin/env bash
# The README's "separate processes" NATS recipe, runnable: a runtime and a sidecar per actor
# (`upper`, `count`), the end actors x-sink and x-sump, and the gateway, each its own
# process, all on one NATS JetStream server; then one task through the flow `shout`.
#
# Needs: a nats-server with JetStream at $ASYA_NATS_URL (default nats://127.0.0.1:4222:
# `nats-server -js -sd /tmp/nats-store &`), `asya-host` on PATH (`cargo install --path host`),
# python3 and curl. Every process started here is stopped when the script exits.
# Ports: ADMIN_PORT (8081, +1 per sidecar) and the gateway's GATEWAY_PORT (8090).
# host/tests/examples_nats.rs runs this script and checks that README.md shows the lines
# between the two markers verbatim.
set -euo pipefail
cd "$(dirname "$0")"
trap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT
# --- README begin ---
export ASYA_NATS_URL=${ASYA_NATS_URL:-nats://127.0.0.1:4222} ASYA_NAMESPACE=demo
export ASYA_GATEWAY_URL=http://127.0.0.1:${GATEWAY_PORT:-8090}
asya-host provision --actors upper,count          # stream + consumers, x-sink/x-sump too; idempotent
sockets=$(mktemp -d)                              # one socket directory per actor
port=${ADMIN_PORT:-8081}                          # each sidecar's admin server (/metrics, /readyz)
for a in upper count; do                          # a runtime and its sidecar per actor
  mkdir -p $sockets/$a
  ASYA_HANDLER=handlers.$a ASYA_SOCKET_DIR=$sockets/$a python3 ../../sdk/python/asya_runtime.py &
  ASYA_ACTOR_NAME=$a ASYA_SOCKET_DIR=$sockets/$a ASYA_METRICS_ADDR=127.0.0.1:$port asya-host sidecar &
  port=$((port + 1))
done
for a in x-sink x-sump; do                        # end actors: report final states to the gateway
  ASYA_ACTOR_NAME=$a ASYA_IS_END_ACTOR=true ASYA_METRICS_ADDR=127.0.0.1:$port asya-host sidecar &
  port=$((port + 1))
done
ASYA_GATEWAY_FLOWS=flows.toml ASYA_GATEWAY_STORE=nats ASYA_GATEWAY_ADDR=${ASYA_GATEWAY_URL#http://} asya-host gateway &
for _ in $(seq 100); do curl -sf $ASYA_GATEWAY_URL/healthz >/dev/null && break; sleep 0.1; done
task=$(asya-host send shout '{"text": "hello mesh"}' --wait --timeout 30s)
echo "$task"                                      # "status": "succeeded", "result": {"length": 10, "text": "HELLO MESH"}
asya-host trace $(echo "$task" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
# --- README end ---
