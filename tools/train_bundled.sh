#!/usr/bin/env bash
# Reproduce the bundled checkpoints: train each detector from scratch on the synthetic set
# with mmdet's own training tool, strip the result to state_dict + meta, and record its
# full-val and first-100-val AP (mmdet's CocoMetric) into checkpoints/bundled.json.
#
#   bash tools/train_bundled.sh [retinanet_r18-16_fpn64_synthetic ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=.venv/bin/python
MIM=.venv/bin/mim
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(retinanet_r18-16_fpn64_synthetic faster-rcnn_r18-16_fpn64_synthetic fcos_r18-16_fpn64_synthetic)
$PY -m mmdet_regptq.datasets.synthetic --out data/synthetic --seed 0
for name in "${names[@]}"; do
  cfg=configs/synthetic/$name.py
  work=work_dirs/$name
  cmd="mim train mmdet $cfg --work-dir $work --cfg-options randomness.seed=0"
  $MIM train mmdet "$cfg" --work-dir "$work" --cfg-options randomness.seed=0
  last=$(cat "$work/last_checkpoint")
  $PY tools/strip_checkpoint.py "$last" "checkpoints/$name.pth" --note "$cmd"
  $PY tools/record_ap.py "$name"
done
