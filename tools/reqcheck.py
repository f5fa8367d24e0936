"""Print the requirements (from files or arguments) that the running Python does not satisfy.

Used by tools/install.sh so that a second install run only checks and installs nothing.
Exit status 0 always; one unsatisfied requirement per output line.
"""
from __future__ import annotations

import sys
from importlib import metadata

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement


def _lines(args: list[str]) -> list[str]:
    out = []
    for arg in args:
        if arg.startswith('@'):
            with open(arg[1:]) as f:
                out += [ln.split('#')[0].strip() for ln in f]
        else:
            out.append(arg)
    return [ln for ln in out if ln]


def unsatisfied(specs: list[str]) -> list[str]:
    """Return the specs whose distribution is missing or has a version outside the spec."""
    missing = []
    for spec in specs:
        req = Requirement(spec)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(spec)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(spec)
    return missing


if __name__ == '__main__':
    for spec in unsatisfied(_lines(sys.argv[1:])):
        print(spec)
