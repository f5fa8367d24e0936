"""The sweep over mmdet's zoo: one child process per config with a CPU-time limit, results
stored per folder (resumable, shareable by two sweep processes), the report rewritten
after each row and the committed record (``docs/results/zoo_coverage.jsonl``) kept in step."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mmdet_regptq.bench.models import REPO_ROOT
from mmdet_regptq.io import atomic_write_text
from mmdet_regptq.zoo.configs import representatives, zoo_root
from mmdet_regptq.zoo.probe import DEFAULT_MAX_TAIL_UNITS
from mmdet_regptq.zoo.report import (finalize, progress_text, quantized_share, render,
                                      timeout_row, yes_no)

__all__ = ['SweepOptions', 'run_sweep', 'seed_results', 'write_record', 'interrupted_row',
           'claim_folder', 'DEFAULT_RECORD']

#: the committed rows of the last sweep
DEFAULT_RECORD = REPO_ROOT / 'docs' / 'results' / 'zoo_coverage.jsonl'


@dataclass
class SweepOptions:
    """What ``tools/zoo_coverage.py`` passes to :func:`run_sweep` (its options, same names)."""
    out: str = str(REPO_ROOT / 'work_dirs' / 'zoo_coverage')
    max_size: int = 320
    iters: int = 2
    max_proposals: int = 100
    timeout: int = 900
    wall_timeout: int = 4 * 3600
    method: str | None = None
    max_tail_units: int = DEFAULT_MAX_TAIL_UNITS
    record: str = str(DEFAULT_RECORD)
    only: str = ''
    rerun: bool = False
    reverse: bool = False
    render_only: bool = False


def interrupted_row(results: Path, folder: str) -> dict | None:
    """The row of a run whose sweep was stopped (its child's partial JSON is left, newer
    than the stored result, and no live sweep holds the folder), else None."""
    partials = sorted(results.glob(f'.{folder}.*.child.json'), key=lambda p: p.stat().st_mtime)
    done = results / f'{folder}.json'
    if not partials or (done.is_file() and done.stat().st_mtime >= partials[-1].stat().st_mtime):
        return None
    if _held_by_live_process(results / f'.{folder}.running'):
        return None                           # still running
    row = json.loads(partials[-1].read_text())
    return dict(row, folder=folder, stage='interrupted',
                error=f'sweep stopped in {progress_text(row)}')


def _run_child(config: Path, out_json: Path, log: Path, args: SweepOptions) -> dict:
    cmd = [sys.executable, '-m', 'mmdet_regptq.zoo', str(config),
           '--result', str(out_json), '--max-size', str(args.max_size),
           '--iters', str(args.iters), '--max-proposals', str(args.max_proposals),
           '--max-tail-units', str(args.max_tail_units)]
    if args.method:
        cmd += ['--method', args.method]
    def limit_cpu() -> None:   # CPU seconds, not wall time: the machine is shared
        resource.setrlimit(resource.RLIMIT_CPU, (args.timeout, args.timeout + 10))

    used_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, 'w') as log_f:
        proc = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                start_new_session=True, preexec_fn=limit_cpu)
        try:
            proc.wait(timeout=args.wall_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the child's own process group
            proc.wait()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = round(used.ru_utime + used.ru_stime - used_before.ru_utime - used_before.ru_stime, 1)
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) or proc.returncode is None:
        row = json.loads(out_json.read_text()) if out_json.is_file() else {}
        what = (f'{args.timeout} s CPU' if proc.returncode == -signal.SIGXCPU
                else f'{args.wall_timeout} s wall')
        return dict(timeout_row(row, what), cpu_s=cpu_s)
    if out_json.is_file():
        return dict(json.loads(out_json.read_text()), cpu_s=cpu_s)
    tail = [ln for ln in log.read_text(errors='replace').splitlines() if ln.strip()][-1:]
    return dict(stage='crash', cpu_s=cpu_s, error=f'process exited with {proc.returncode}: '
                + (tail[0][:200] if tail else ''))


def _held_by_live_process(path: Path) -> bool:
    """Whether the claim file ``path`` exists and names a live process."""
    try:
        os.kill(int(path.read_text() or 0), 0)
        return True
    except (ProcessLookupError, ValueError, FileNotFoundError):
        return False
    except PermissionError:       # alive, another user's
        return True


def claim_folder(path: Path) -> Path | None:
    """Create ``path`` holding this pid, or None while a live process holds it.

    Two sweep processes on one ``--out`` (one with ``--reverse``) meet in the middle; the
    claim keeps them from running the same folder twice.
    """
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _held_by_live_process(path):
                return None
            path.unlink(missing_ok=True)  # left by a killed sweep
            continue
        with os.fdopen(fd, 'w') as f:
            f.write(str(os.getpid()))
        return path
    return None


def seed_results(record: Path, results: Path) -> int:
    """Copy the committed record's rows into ``results`` where a folder has none yet.

    The record (``docs/results/zoo_coverage.jsonl``) is what makes a sweep resumable across
    machines: ``work_dirs`` is not committed, so a fresh checkout reruns only the folders
    asked for (``--only ... --rerun``) and renders the rest from earlier runs.
    """
    if not record.is_file():
        return 0
    seeded = 0
    for line in record.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        path = results / f"{row['folder']}.json"
        if not path.is_file():
            atomic_write_text(json.dumps(row, indent=1), path)
            seeded += 1
    return seeded


def write_record(results: Path, record: Path) -> None:
    """Write every stored row (tracebacks cut to their last 1500 characters), one JSON line
    per folder, sorted, atomically."""
    rows = [json.loads(p.read_text()) for p in sorted(results.glob('*.json'))
            if not p.name.startswith('.')]
    lines = [json.dumps(dict(r, traceback=r.get('traceback', '')[-1500:]), sort_keys=True)
             for r in sorted(rows, key=lambda r: r['folder'])]
    atomic_write_text('\n'.join(lines) + '\n', record)


def run_sweep(args: SweepOptions) -> None:
    """Run (or with ``render_only`` only report) every representative config; prints the
    report and leaves it in ``<out>/coverage.md``."""
    out = Path(args.out)
    (out / 'logs').mkdir(parents=True, exist_ok=True)
    (out / 'results').mkdir(parents=True, exist_ok=True)
    record = Path(args.record) if args.record else None
    if record is not None:
        seeded = seed_results(record, out / 'results')
        if seeded:
            print(f'{seeded} rows from {record} (rerun a folder with --only F --rerun)')
    reps = representatives()
    if args.only:
        wanted = set(args.only.split(','))
        reps = [r for r in reps if r[0] in wanted]
    skipped = [(f, why) for f, cfg, why in reps if cfg is None]
    rows = []
    started = time.time()
    for folder, cfg, _ in (reversed(reps) if args.reverse else reps):
        if cfg is None:
            continue
        res_path = out / 'results' / f'{folder}.json'
        interrupted = interrupted_row(out / 'results', folder) if args.render_only else None
        if interrupted is not None:
            row = interrupted
        elif args.render_only and not res_path.is_file():
            continue
        elif res_path.is_file() and (not args.rerun or res_path.stat().st_mtime > started):
            row = json.loads(res_path.read_text())     # --rerun: not what another sweep
                                                       # process finished since we started
        else:
            claim = claim_folder(out / 'results' / f'.{folder}.running')
            if claim is None:  # another sweep process is on this folder
                continue
            t0 = time.perf_counter()
            tmp = out / 'results' / f'.{folder}.{os.getpid()}.child.json'
            tmp.unlink(missing_ok=True)
            row = _run_child(cfg, tmp, out / 'logs' / f'{folder}.log', args)
            tmp.unlink(missing_ok=True)
            row.setdefault('config', str(cfg.relative_to(zoo_root())))
            row.setdefault('seconds', round(time.perf_counter() - t0, 1))
            row['folder'] = folder
            row['cpu_limit_s'] = args.timeout
            finalize(row)
            atomic_write_text(json.dumps(row, indent=1), res_path)
            claim.unlink(missing_ok=True)
            if record is not None:
                write_record(out / 'results', record)
        row['folder'] = folder
        rows.append(finalize(row))
        print(f"{folder:22s} fp={yes_no(row.get('fp_ok')):3s} quant={quantized_share(row):14s} "
              f"calib={yes_no(row.get('calibrated')):3s} pred={yes_no(row.get('predicted')):3s} "
              f"{row.get('seconds', '-')}s {row.get('error', '')[:90]}", flush=True)
        report = out / 'coverage.md'
        rows.sort(key=lambda r: r['folder'])
        atomic_write_text(render(rows, skipped, args), report)
    print((out / 'coverage.md').read_text())
