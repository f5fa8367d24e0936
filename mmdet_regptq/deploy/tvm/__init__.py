"""TVM: integer graph, Relax build with CPU schedules and the VNNI kernel, artifact runner.

``runner`` and ``packed`` need only NumPy and TVM (the torch-free runtime loads them).
"""
