"""What the command-line benchmarks (``benchmarks/*.py``) share: the models they build, the
``w4a4`` / ``LABEL=NAME{json}`` specs they parse and the interleaved timer.

The scripts stay thin front ends (argument parsing, printing); the pieces two of them use
live here. Nothing is imported at package level, so a script pays only for what it uses.
"""
