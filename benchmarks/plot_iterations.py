"""AP against calibration iterations per unit, from an accuracy results CSV.

    python benchmarks/plot_iterations.py docs/results/yolov5_accuracy.csv \
        --out docs/images/yolov5_iterations.png [--detector yolov5n] [--num-images 16]

Reads the rows ``benchmarks/accuracy.py`` writes (``detector, method, bits, bbox_mAP,
iters, ...``; several runs merged into one file), keeps every (method, bits) measured at
two or more iteration counts, and draws one line each: AP (0-100) against iterations per
unit on a log axis, with the FP row as a dashed line and 95 % of it dotted. Prints the
points it drew. Whether the schedule or the quantizer limits a bit width is easier to see
as a curve than in the table's rows.
"""
from __future__ import annotations

import argparse
import csv
import os
from collections import defaultdict
from pathlib import Path


def read_curves(path: Path, detector: str | None, num_images: int | None = None
                ) -> tuple[float | None, dict[tuple[str, str], list[tuple[int, float]]]]:
    """FP AP (0-100, or None) and, per (method, bits) with >= 2 iteration counts, the
    ``(iters, AP)`` points sorted by iterations (a repeated count keeps its last row).
    ``num_images``: only the runs calibrated on that many images (a curve is one setting)."""
    fp = None
    points: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    with open(path, newline='') as f:
        for row in csv.DictReader(f):
            if detector is not None and row['detector'] != detector:
                continue
            ap = 100 * float(row['bbox_mAP'])
            if row['method'] == 'FP':
                fp = ap
            elif num_images is not None and int(row.get('num_images') or 0) != num_images:
                continue
            elif int(row['iters'] or 0) > 0:
                points[(row['method'], row['bits'])][int(row['iters'])] = ap
    curves = {key: sorted(by_iters.items()) for key, by_iters in points.items()
              if len(by_iters) >= 2}
    return fp, curves


def plot(fp: float | None, curves: dict[tuple[str, str], list[tuple[int, float]]],
         path: Path, title: str) -> None:
    """One line per (method, bits); written to a temporary file, then renamed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, bits), pts in sorted(curves.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker='o', label=f'{method} {bits.upper()}')
    if fp is not None:
        ax.axhline(fp, color='k', linestyle='--', linewidth=1, label=f'FP {fp:.1f}')
        ax.axhline(0.95 * fp, color='k', linestyle=':', linewidth=1, label='95 % of FP')
    ax.set_xscale('log')
    ticks = sorted({it for pts in curves.values() for it, _ in pts})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel('calibration iterations per unit')
    ax.set_ylabel('bbox AP (0-100)')
    ax.set_title(title, fontsize=10)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + '.tmp')
    fig.savefig(tmp, dpi=120, format='png')
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('csv', type=Path, help='results CSV of benchmarks/accuracy.py')
    parser.add_argument('--out', type=Path, required=True, help='PNG to write')
    parser.add_argument('--detector', default=None,
                        help='only this detector\'s rows (default: all rows)')
    parser.add_argument('--num-images', type=int, default=None,
                        help='only the runs on this many calibration images (default: all)')
    parser.add_argument('--title', default='AP against calibration iterations per unit')
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        parser.error(f'csv: {args.csv} does not exist')
    fp, curves = read_curves(args.csv, args.detector, args.num_images)
    if not curves:
        parser.error(f'csv: {args.csv} has no (method, bits) at two or more iteration counts')
    for (method, bits), pts in sorted(curves.items()):
        print(f'{method:9s} {bits:5s} ' + '  '.join(f'{it}: {ap:.1f}' for it, ap in pts))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(fp, curves, args.out, args.title)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
