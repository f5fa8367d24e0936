"""The CPU a latency figure was measured on: every timing script prints it."""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_name(cpuinfo: str = '/proc/cpuinfo') -> str:
    """``model name (AVX-512 VNNI: yes|no)`` of this CPU, from ``/proc/cpuinfo`` (what
    the hardware has: a CPUID shim preloaded into the process does not change it)."""
    path = Path(cpuinfo)
    info = path.read_text() if path.is_file() else ''
    name = next((ln.split(':', 1)[1].strip() for ln in info.splitlines()
                 if ln.startswith('model name')), platform.processor())
    return f"{name} (AVX-512 VNNI: {'yes' if 'avx512_vnni' in info else 'no'})"
