"""The sweep's rows as a report: failure classes, timeouts, and the Markdown table."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmdet_regptq.zoo.configs import representatives

__all__ = ['classify_fp', 'classify_quant', 'timeout_row', 'finalize', 'render',
           'progress_text', 'quantized_share', 'seconds_cell', 'yes_no']


def classify_fp(err: str) -> str:
    """Reason class of a failure before quantization (the FP model)."""
    low = err.lower()
    if 'modulenotfounderror' in low or 'no module named' in low or (
            'importerror' in low and 'cannot import' in low) or 'please install' in low \
            or 'pip install' in low or 'is not installed' in low:
        return 'optional package missing'
    if 'required positional argument' in low or 'unexpected keyword argument' in low:
        return 'zoo config does not build in mmdet 3.3'
    if ('not implemented for' in low and 'cpu' in low) or 'only supports gpu' in low or \
            'implementation for device cpu not found' in low or \
            'cuda' in low or 'not compiled with gpu' in low:
        return 'mmcv op without CPU kernel'
    if 'http' in low or 'connection' in low or 'huggingface' in low or 'resolve' in low:
        return 'needs a download'
    if 'timeout' in low:
        return 'timeout'
    if 'no test pipeline' in low or 'model' in low and 'keyerror' in low:
        return 'config is not a single detector'
    return 'other'


def classify_quant(stage: str, err: str) -> str:
    """Reason class of a failure after the FP model worked."""
    low = err.lower()
    if stage == 'timeout':
        return 'timeout'
    if 'must match the size of tensor' in low or 'size mismatch' in low or (
            'shape' in low and 'mismatch' in low):
        return f'{stage}: data-dependent shapes differ between FP and quantized passes'
    if 'not finite' in low or 'nan' in low or 'inf' in low:
        return f'{stage}: non-finite values'
    if 'used before init_from' in low:
        return f'{stage}: quantizer never saw data (module bypassed by the forward)'
    if 'notimplementederror' in low:
        return f'{stage}: detector has no raw forward (_forward)'
    return f'{stage}: {err.split(":")[0].strip()[:60]}'


def progress_text(row: dict) -> str:
    """A partial row's last stage, and in the calibration how many units it finished."""
    where = row.get('stage', 'load')
    if row.get('units_done') and where == 'quantize+calibrate':
        where += f" after {row['units_done']} units (last: {row['last_unit']})"
    return where


def timeout_row(row: dict, what: str) -> dict:
    """The row of a child killed after ``what`` (``'900 s CPU'``)."""
    return dict(row, timeout_in=row.get('stage', 'load'), stage='timeout',
                error=f'timeout after {what} in {progress_text(row)}')


def finalize(row: dict) -> dict:
    """Add the failure class and the table cells to a result row."""
    if row.get('stage') == 'interrupted':
        row['failure'] = 'interrupted (sweep stopped)'
    elif row.get('stage') == 'timeout':
        row['failure'] = f"timeout (in {row.get('timeout_in', 'load')})"
    elif not row.get('fp_ok'):
        row['failure'] = classify_fp(
            row.get('error', '') + row.get('traceback', '')[-1500:])
    elif not row.get('predicted'):
        row['failure'] = classify_quant(row.get('stage', ''), row.get('error', ''))
    else:
        row['failure'] = ''
    return row


def seconds_cell(row: dict, default_limit: int) -> str:
    """Wall seconds, with the row's CPU limit when it ran under another ``--timeout``."""
    limit = row.get('cpu_limit_s', default_limit)
    return f"{row.get('seconds', '-')}" + (f' (limit {limit} CPU-s)' if limit != default_limit
                                           else '')


def quantized_share(row: dict) -> str:
    n = row.get('n_conv_linear') or 0
    if not n or not row.get('fp_ok'):
        return '-'
    q = row.get('n_quantized') or 0
    return f'{100 * q / n:.0f}% ({q}/{n})'


def yes_no(flag: Any) -> str:
    return 'yes' if flag else 'no'


def render(rows: list[dict], skipped: list[tuple[str, str]], args: Any) -> str:
    """Markdown report: summary, main table, FP failures, quantization failures, skips.

    ``args`` holds the sweep's options (a :class:`~mmdet_regptq.zoo.sweep.SweepOptions` or
    the tool's parsed arguments): they make the command line the report names.
    """
    fp_ok = [r for r in rows if r.get('fp_ok')]
    full = [r for r in fp_ok if r.get('predicted')]
    calibrated = [r for r in fp_ok if r.get('calibrated')]
    methods = sorted({r.get('method', '?') for r in calibrated if r.get('method')})
    pending = [f for f, cfg, _ in representatives() if cfg is not None] if args.render_only \
        else []
    missing = sorted(set(pending) - {r['folder'] for r in rows})
    lines = [
        '# MMDet zoo coverage', '',
        f'Command: `nice -n 15 env OMP_NUM_THREADS=1 .venv/bin/python tools/zoo_coverage.py '
        f'--max-size {args.max_size} --iters {args.iters} --timeout {args.timeout} '
        f'--max-proposals {args.max_proposals}'
        + (f' --max-tail-units {args.max_tail_units}'
           if getattr(args, 'max_tail_units', None) is not None else '')
        + (f' --method {args.method}' if args.method else '') + '`', '',
        f'- folders swept: {len(rows)} (+{len(skipped)} out of scope)'
        + (f'; not run yet: {len(missing)} ({", ".join(missing)})' if missing else ''),
        f'- FP builds and predicts: {len(fp_ok)} / {len(rows)}',
        f'- of those, quantized + calibrated: {len(calibrated)} / {len(fp_ok)}; '
        f'quantized + calibrated + predicts: **{len(full)} / {len(fp_ok)}'
        + (f' ({100 * len(full) / len(fp_ok):.1f}%)**' if fp_ok else '**'),
        f'- calibration method: {", ".join(methods)} ({args.iters} iterations per unit, '
        '2 synthetic images, W4A4 default policy)',
        '- two-stage rows whose note says "RPN proposals N -> M" ran with the proposal cap; '
        'two-stage rows without that note ran with the config\'s own count',
        '- rows whose note says "depth bound" ran with Reg-PTQ\'s `max_tail_units` '
        '(`--max-tail-units`; the units further from the output run no tail of their own); '
        'the other rows ran without a bound, which gives the same calibration where a '
        'config has at most `--max-tail-units` + 1 units', '',
        '| folder | config | input | FP builds+predicts | % Conv/Linear quantized | '
        'calibrated | predicted | s | error |',
        '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        err = (r.get('error') or '').replace('|', '\\|').replace('\n', ' ')[:140]
        if r.get('note'):
            err = f"{err} *({r['note']})*".strip()
        lines.append(f"| {r['folder']} | {Path(r.get('config', '')).name} | "
                     f"{r.get('input', '-')} | {yes_no(r.get('fp_ok'))} | {quantized_share(r)} | "
                     f"{yes_no(r.get('calibrated'))} | {yes_no(r.get('predicted'))} | "
                     f"{seconds_cell(r, args.timeout)} | {err} |")
    fp_fail = [r for r in rows if not r.get('fp_ok')]
    lines += _failure_table(f'FP failures ({len(fp_fail)}): not counted in the quantization '
                            'rate', 'reason', fp_fail)
    q_fail = [r for r in fp_ok if not r.get('predicted')]
    lines += _failure_table(f'Quantization failures ({len(q_fail)})', 'class', q_fail)
    classes: dict[str, int] = {}
    for r in q_fail:
        classes[r['failure']] = classes.get(r['failure'], 0) + 1
    if classes:
        lines += ['', 'By class: ' + '; '.join(f'{k}: {v}' for k, v in
                                               sorted(classes.items(), key=lambda kv: -kv[1]))]
    lines += ['', '## Out of scope', '', ', '.join(f'{f} ({why})' for f, why in skipped), '']
    return '\n'.join(lines)


def _failure_table(title: str, what: str, rows: list[dict]) -> list[str]:
    """A Markdown section: one row per failed folder with its failure class and error."""
    lines = ['', f'## {title}', '', f'| folder | config | {what} | error |', '|---|---|---|---|']
    for r in rows:
        err = (r.get('error') or '').replace('|', '\\|')[:160]
        lines.append(f"| {r['folder']} | {Path(r.get('config', '')).name} | "
                     f"{r.get('failure')} | {err} |")
    return lines
