"""Convert an Ultralytics YOLOv5 v6 checkpoint for the mmdet configs in configs/yolov5/.

    python tools/convert_yolov5.py yolov5n.pt work_dirs/yolov5n_mmdet.pth \
        [--config configs/yolov5/yolov5_n_coco.py]

SRC is an official release ``.pt`` (read with an allow-listed unpickler: no yolov5 code is
needed and no pickled code runs) or a plain state dict with the Ultralytics keys. DST holds
``{'state_dict', 'meta'}`` and loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='yolov5*.pt release checkpoint or plain state dict')
    parser.add_argument('dst', help='converted checkpoint to write')
    parser.add_argument('--config', help='fail unless this config matches the weights')
    args = parser.parse_args(argv)
    import pickle

    from mmdet_regptq.yolov5.convert import convert_yolov5
    try:
        meta = convert_yolov5(args.src, args.dst, config=args.config)['yolov5']
    except (FileNotFoundError, KeyError, ValueError, pickle.UnpicklingError) as err:
        parser.exit(1, f'convert_yolov5: error: {err}\n')
    print(f"wrote {args.dst}: yolov5{meta['size'] or '?'} (depth {meta['depth_multiple']}, "
          f"width {meta['width_multiple']}, {meta['num_classes']} classes); "
          f"config: {meta['config']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
