"""Torch-free inference: the ONNX contract, ONNX Runtime detector, folder scans, QA report.

Nothing in this package imports torch (``tests/test_torch_free.py`` checks it),
so an inspection line needs only numpy, onnxruntime and the imaging wing.
"""
