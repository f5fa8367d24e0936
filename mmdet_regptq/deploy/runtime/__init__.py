"""The torch-free runtime of a deployed work dir (NumPy, ONNX Runtime or TVM, OpenCV).

Nothing here imports torch, mmcv, mmdet or onnx: ``python -m mmdet_regptq.deploy.run``
runs where only these are installed. ``spec.json`` (written at deploy time) says how to
preprocess an image, which backend file to run and how to post-process its outputs.
"""
