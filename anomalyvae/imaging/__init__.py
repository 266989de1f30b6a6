"""Torch-free imaging: decoding (8/16-bit, grey/RGB, DICOM/NIfTI), preprocessing, atomic writes.

Nothing in this package imports torch (``tests/test_torch_free.py`` checks it).
"""
