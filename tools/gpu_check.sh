#!/usr/bin/env bash
# The GPU checks, as one script for a borrowed CUDA machine (its own python3 with torch; no
# registry): CUDA latency of FP32 / FP16 / fake-quant detectors (benchmarks/gpu.py), then
# QDrop vs Reg-PTQ calibration time and AP on the GPU (benchmarks/accuracy.py) for the
# bundled RetinaNet (W4A4) and Faster R-CNN (W2A4), the same settings as README's CPU rows.
#
# Needs, prepared by tools/prepare_gpu_bundle.sh where pip works: .gpu/whl/ (cp312 wheels of the
# pure-Python deps and pycocotools / shapely) and .gpu/site/ (mmcv without its compiled ops,
# mmengine, mmdet, with their dist-info). mmcv's compiled ops are replaced by
# benchmarks/mmcv_ext_torchvision.py (NMS and RoIAlign from torchvision).
# Writes its tables under $OUT (default work_dirs/gpu_check).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-work_dirs/gpu_check}
SITE=${SITE:-/tmp/regptq_site}
mkdir -p "$OUT" "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .gpu/whl/*.whl || exit 1
cp -r .gpu/site/* "$SITE"/
cp benchmarks/mmcv_ext_torchvision.py "$SITE"/mmcv/_ext.py
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    | tee "$OUT/env.txt"
python3 -c "import sys, torch, mmcv, mmdet, mmengine, onnxruntime as ort
print('python', sys.version.split()[0], 'torch', torch.__version__, 'mmcv', mmcv.__version__,
      'mmdet', mmdet.__version__, 'mmengine', mmengine.__version__,
      'onnxruntime providers', ort.get_available_providers())" 2>&1 | tee -a "$OUT/env.txt"

# the synthetic dataset (seeded; the same annotations as on CPU) while the latency runs
python3 -m mmdet_regptq.datasets.synthetic --out data/synthetic --seed 0 > "$OUT/synth.log" 2>&1 &
SYNTH=$!
timeout -k 5 "${LATENCY_S:-120}" python3 benchmarks/gpu.py --runs 50 \
    --csv "$OUT/gpu_latency.csv" 2>&1 | grep -v '^Loads checkpoint' | tee "$OUT/gpu_latency.log"
wait $SYNTH || { tail -5 "$OUT/synth.log"; exit 1; }

ACC=/tmp/regptq_gpu_acc
timeout -k 5 "${RETINANET_S:-150}" python3 benchmarks/accuracy.py --detectors retinanet \
    --methods QDrop RegPTQ --bits w4a4 --iters 100 --num-images 32 --val-images 100 \
    --out "$ACC/retinanet" 2>&1 | tee "$OUT/acc_retinanet.log"
cp "$ACC/retinanet/results.csv" "$OUT/acc_retinanet.csv" 2>/dev/null
timeout -k 5 "${FRCNN_S:-170}" python3 benchmarks/accuracy.py --detectors faster-rcnn \
    --methods QDrop RegPTQ --bits w2a4 --iters 100 --num-images 32 --val-images 100 \
    --no-fp --out "$ACC/frcnn" 2>&1 | tee "$OUT/acc_frcnn.log"
cp "$ACC/frcnn/results.csv" "$OUT/acc_frcnn.csv" 2>/dev/null
exit 0
