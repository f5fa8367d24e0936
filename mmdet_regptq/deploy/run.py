"""Run a deployed detector on images, without torch or mmdet.

    python -m mmdet_regptq.deploy.run WORK_DIR IMAGE [IMAGE ...] [--out dets.json]
        [--score-thr 0.3] [--threads 1]

Prints one line per detection (image, class, score, box in the image's pixels) and, with
``--out``, writes all detections as JSON. Imports only NumPy, OpenCV and ONNX Runtime or
TVM (``mmdet_regptq`` skips its torch / mmdet imports for this entry point).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from mmdet_regptq.deploy.runtime.detector import Detector

__all__ = ['main']


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m mmdet_regptq.deploy.run',
                                     description=__doc__.splitlines()[0])
    parser.add_argument('work_dir', help='deploy work dir (with spec.json)')
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument('--out', help='write all detections to this JSON file')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='print detections above this score (default 0.3; --out keeps all)')
    parser.add_argument('--threads', type=int, default=0, help='ONNX Runtime threads')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    detector = Detector(args.work_dir, threads=args.threads)
    results = {}
    for image in args.images:
        dets = detector(image)
        results[image] = dets.to_list(detector.classes)
        for det in results[image]:
            if det['score'] >= args.score_thr:
                name = det.get('class', det['label'])
                print(f'{image}\t{name}\t{det["score"]:.3f}\t'
                      + ' '.join(f'{v:.1f}' for v in det['bbox']))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, suffix='.tmp')
        with os.fdopen(fd, 'w') as f:
            json.dump(results, f)
        os.replace(tmp, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
