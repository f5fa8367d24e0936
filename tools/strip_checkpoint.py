"""Strip an mmengine training checkpoint to ``state_dict`` + plain ``meta``.

The result loads with torch's default ``weights_only=True`` (no allow-listing), is about
a third of the size (no optimizer state), and is what the repo commits under
``checkpoints/``.

    python tools/strip_checkpoint.py work_dirs/x/epoch_24.pth checkpoints/x.pth \
        --note "mim train mmdet configs/... --cfg-options randomness.seed=0"
"""
from __future__ import annotations

import argparse

from mmdet_regptq.compat import load_local_checkpoint
from mmdet_regptq.io import atomic_save


def strip(src: str, dst: str, note: str = '') -> dict:
    """Write the stripped checkpoint and return its meta."""
    ckpt = load_local_checkpoint(src, map_location='cpu')  # training checkpoints: see compat
    meta = ckpt.get('meta', {})
    plain = {
        'dataset_meta': meta.get('dataset_meta'),
        'epoch': meta.get('epoch'),
        'iter': meta.get('iter'),
        'seed': meta.get('seed'),
        'mmdet_version': meta.get('mmdet_version'),
        'note': note,
    }
    atomic_save({'state_dict': ckpt['state_dict'], 'meta': plain}, dst)
    return plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src')
    parser.add_argument('dst')
    parser.add_argument('--note', default='', help='how the checkpoint was produced')
    args = parser.parse_args()
    print(strip(args.src, args.dst, args.note))


if __name__ == '__main__':
    main()
