"""ONNX: Q/DQ export and lowering, ONNX Runtime INT8 graphs, sessions, profiling, checks."""
