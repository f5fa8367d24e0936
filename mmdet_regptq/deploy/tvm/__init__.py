"""TVM: integer graph, Relax build with CPU schedules and the VNNI / AVX2 int8 kernels,
artifact runner.

``runner`` and ``packed`` need only NumPy and TVM (the torch-free runtime loads them).
"""
