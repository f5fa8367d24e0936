#!/usr/bin/env bash
# Prepare .gpu/ for tools/gpu_check.sh on a borrowed CUDA machine that has its own python3
# (3.12) and torch but no registry and no mmcv/mmdet/mmengine: cp312 wheels of the small
# dependencies (.gpu/whl) and the pure-Python parts of mmcv / mmengine / mmdet from this
# checkout's .venv (.gpu/site; mmcv's compiled ops are left out, gpu_check.sh puts
# benchmarks/mmcv_ext_torchvision.py in their place). Run here, where pip works.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
SITE_PACKAGES=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/site
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .gpu/whl \
    pycocotools shapely addict termcolor yapf platformdirs terminaltables 'setuptools<81'
for pkg in mmcv mmengine mmdet; do
    (cd "$SITE_PACKAGES" && tar --exclude='*.so' --exclude='__pycache__' -cf - "$pkg" \
        "$pkg"-*.dist-info) | tar -C .gpu/site -xf -
done
du -sh .gpu
