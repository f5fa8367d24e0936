"""Whether this interpreter runs the torch-free deployment runtime.

``python -m mmdet_regptq.deploy.run`` imports the ``mmdet_regptq`` and
``mmdet_regptq.deploy`` packages before the runtime module itself; both skip their
torch / mmdet imports when this says so, so the runtime needs neither installed.
"""
from __future__ import annotations

import sys

__all__ = ['RUNTIME_MODULE', 'runtime_only']

#: The module run by ``python -m`` for the torch-free runtime.
RUNTIME_MODULE = 'mmdet_regptq.deploy.run'


def runtime_only() -> bool:
    """True when the interpreter was started as ``python [opts] -m mmdet_regptq.deploy.run``."""
    argv = list(getattr(sys, 'orig_argv', ()))[1:]
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == '-m':
            return i + 1 < len(argv) and argv[i + 1] == RUNTIME_MODULE
        if arg.startswith('-m'):
            return arg[2:] == RUNTIME_MODULE
        if arg in ('-c', '-') or not arg.startswith('-'):
            return False             # a command, stdin or a script: not the runtime
        i += 2 if arg in ('-X', '-W') else 1    # options with a separate value
    return False
