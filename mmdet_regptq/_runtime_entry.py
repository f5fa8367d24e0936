"""Whether this interpreter runs one of the torch-free entry points.

``python -m mmdet_regptq.deploy.run`` imports the ``mmdet_regptq`` and
``mmdet_regptq.deploy`` packages before the runtime module itself; both skip their
torch / mmdet imports when this says so, so the runtime needs neither installed. The
CPUID shim builder (``python -m mmdet_regptq.deploy.onnx.avx2_shim``) is light the same
way, so that its stdout is the shim's path alone (``SHIM=$(python -m ...)``), not
mmengine's log lines.
"""
from __future__ import annotations

import sys

__all__ = ['RUNTIME_MODULE', 'LIGHT_MODULES', 'runtime_only']

#: The module run by ``python -m`` for the torch-free runtime.
RUNTIME_MODULE = 'mmdet_regptq.deploy.run'
#: Every module that ``python -m`` may run without the torch / mmdet imports.
LIGHT_MODULES = (RUNTIME_MODULE, 'mmdet_regptq.deploy.onnx.avx2_shim')


def runtime_only() -> bool:
    """True when the interpreter was started as ``python [opts] -m MODULE`` for a module
    of :data:`LIGHT_MODULES`."""
    argv = list(getattr(sys, 'orig_argv', ()))[1:]
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == '-m':
            return i + 1 < len(argv) and argv[i + 1] in LIGHT_MODULES
        if arg.startswith('-m'):
            return arg[2:] in LIGHT_MODULES
        if arg in ('-c', '-') or not arg.startswith('-'):
            return False             # a command, stdin or a script: not the runtime
        i += 2 if arg in ('-X', '-W') else 1    # options with a separate value
    return False
