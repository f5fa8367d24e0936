"""The command-line specs of the benchmarks: bit widths (``w4a4``) and PTQ methods
(``QDrop``, or a variant ``LABEL=NAME{json options}``)."""
from __future__ import annotations

import argparse
import json
import re

__all__ = ['parse_bits', 'parse_method']


def parse_bits(text: str) -> tuple[int, int]:
    """``'w4a4'`` -> ``(4, 4)`` (weight bits, activation bits)."""
    match = re.fullmatch(r'w(\d+)a(\d+)', text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f'--bits {text!r}: expected like w4a4')
    return int(match.group(1)), int(match.group(2))


def parse_method(spec: str) -> tuple[str, str, dict]:
    """``QDrop`` -> ('QDrop', 'QDrop', {}); ``L=RegPTQ{"schedule": {"fisher": false}}`` ->
    (L, RegPTQ, {...}).

    Returns ``(label, registered method name, options)``; the options go into the method's
    config beside ``type``.
    """
    match = re.fullmatch(r'(?:([\w.+-]+)=)?(\w+)(\{.*\})?', spec.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f'--methods {spec!r}: expected NAME or LABEL=NAME{{json options}}')
    label, kind, options = match.groups()
    try:
        opts = json.loads(options) if options else {}
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f'--methods {spec!r}: options are not JSON: {err}')
    return label or kind, kind, opts
