"""One benchmark row per subprocess: the child prints ``RESULT {json}`` as its last row, the
parent runs it with stdout + stderr into a log beside the results and reads the row back.

A child of its own gives each row its own peak RSS and a log to read when it fails."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Sequence

__all__ = ['RESULT_PREFIX', 'read_result', 'run_child']

RESULT_PREFIX = 'RESULT '


def read_result(log: Path) -> dict | None:
    """The row a child printed last into its log (``RESULT {json}``), if any."""
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None


def run_child(cmd: Sequence[str], log: Path, cwd: Path, label: str) -> dict:
    """Run ``cmd`` with its output in ``log``; its row, or an error naming ``label`` and
    the log when it failed or printed no row."""
    with open(log, 'w') as f:
        proc = subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    row = read_result(log)
    if proc.returncode != 0 or row is None:
        raise RuntimeError(f'{label} failed (exit {proc.returncode}); see {log}')
    return row
