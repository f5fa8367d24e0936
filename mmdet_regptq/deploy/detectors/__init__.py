"""The PyTorch side of a deployment: which part of a (quantized) detector is a graph."""
