#!/usr/bin/env bash
# Install the mmdet-regptq stack into a virtualenv. Idempotent: a second run only checks.
#
#   bash tools/install.sh            # venv at ./.venv (REGPTQ_VENV overrides)
#
# What it does and why (facts measured on these machines: see docs/install.md):
#  1. torch 2.14.1 + torchvision 0.29.1 (pip takes them from local disk here);
#  2. mmcv 2.1.0 from its source release, with setup.py's -std=c++14/17 raised to c++20
#     (torch 2.14's headers need C++20). The wheel is cached outside the clone, keyed by
#     torch version and Python, so the ~14 min build happens once per machine;
#  3. mmengine, mmdet, pycocotools, onnx, onnxruntime, apache-tvm, pytest, this package
#     (editable) with pinned versions from requirements/constraints.txt;
#  4. mmdeploy 1.3.1 and openmim 0.3.9 with --no-deps plus what they import
#     (their metadata pins protobuf<=3.20.2 / pulls openxlab).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REGPTQ_VENV:-$ROOT/.venv}"
CACHE="${REGPTQ_CACHE:-$HOME/.cache/mmdet-regptq}"
PYTHON="${PYTHON:-python3.11}"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
TORCH_VERSION=2.14.1
MMCV_VERSION=2.1.0

log() { echo "[install] $*"; }
# torch's wheel unpacks to ~6 GB in the venv; say so up front instead of failing mid-install.
free_gb=$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print int($4 / 1048576)}')
if [ ! -x "$VENV/bin/python" ] && [ "${free_gb:-0}" -lt 10 ]; then
  log "WARNING: only ${free_gb} GB free under $(dirname "$VENV"); a new venv needs about 10 GB (torch alone ~6 GB)"
fi
[ -x "$VENV/bin/python" ] || { log "creating virtualenv $VENV"; "$PYTHON" -m venv "$VENV"; }
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
missing() { "$PY" "$ROOT/tools/reqcheck.py" "$@"; }
pip_install() { log "pip install $*"; "${PIP[@]}" install -q -c "$CONSTRAINTS" "$@"; }

# 1. torch and the build tools mmcv's build imports (setuptools<81 still has pkg_resources).
need=$(missing "torch==$TORCH_VERSION" torchvision==0.29.1 'setuptools>=77,<81' wheel ninja)
[ -z "$need" ] || pip_install $need

# 2. mmcv from source, cached wheel.
if [ -n "$(missing "mmcv==$MMCV_VERSION")" ]; then
  pyver=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  wheel_dir="$CACHE/wheels/torch-$TORCH_VERSION-$pyver"
  wheel=$(ls "$wheel_dir"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    log "building mmcv $MMCV_VERSION from source (about 14 minutes on 2 cores; cached in $wheel_dir)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation "mmcv==$MMCV_VERSION" -d "$tmp/src"
    tar xzf "$tmp"/src/mmcv-"$MMCV_VERSION".tar.gz -C "$tmp/src"
    sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$tmp/src/mmcv-$MMCV_VERSION/setup.py"
    MAX_JOBS="${MAX_JOBS:-2}" "${PIP[@]}" wheel -q --no-build-isolation --no-deps \
      "$tmp/src/mmcv-$MMCV_VERSION" -w "$tmp/wheel"
    mkdir -p "$wheel_dir"
    built=$(ls "$tmp"/wheel/mmcv-*.whl)
    cp "$built" "$wheel_dir/.partial.whl" && mv "$wheel_dir/.partial.whl" "$wheel_dir/$(basename "$built")"
    wheel="$wheel_dir/$(basename "$built")"
  fi
  pip_install --no-deps "$wheel"
fi

# 3. The rest of the stack and this package (editable), pinned by the constraints file.
need=$(missing mmengine==0.10.7 mmdet==3.3.0 pycocotools onnx onnxruntime apache-tvm pytest \
  addict yapf opencv-python 'protobuf>=4')
[ -z "$need" ] || pip_install $need

# 4. mmdeploy and openmim without their stale pins, plus what they import.
need=$(missing @"$ROOT/requirements/nodeps-imports.txt")
[ -z "$need" ] || pip_install $need
need=$(missing @"$ROOT/requirements/nodeps.txt")
[ -z "$need" ] || { log "pip install --no-deps $need"; "${PIP[@]}" install -q --no-deps $need; }

# 5. This package, editable, from this clone.
if ! "$PY" - "$ROOT" <<'PYEOF'
import json, sys
from importlib import metadata
try:
    dist = metadata.distribution('mmdet-regptq')
    url = json.loads(dist.read_text('direct_url.json') or '{}').get('url', '')
except metadata.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if url == 'file://' + sys.argv[1] else 1)
PYEOF
then
  pip_install --no-deps --no-build-isolation -e "$ROOT"
fi

"$PY" - <<'PYEOF'
import mmcv, mmdet, mmengine, torch
import mmcv.ops  # noqa: F401  the compiled extension
import mmdeploy.apis  # noqa: F401
import onnx, onnxruntime, tvm
print(f'[install] ok: torch {torch.__version__}, mmengine {mmengine.__version__}, mmcv {mmcv.__version__}, '
      f'mmdet {mmdet.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, tvm {tvm.__version__}')
PYEOF
