"""Datasets bundled with ``mmdet_regptq``.

This package deliberately imports nothing at module level so that the
dataset generators (e.g. :mod:`mmdet_regptq.datasets.synthetic`) can be run
and tested without MMCV / MMDetection being installed.
"""
