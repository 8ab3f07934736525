"""Test-local reproductions of Non-local blocks that are not on PyPI, written from their
published forwards (SlowFast's nonlocal_helper.Nonlocal, AlexHex7/Non-local_pytorch's
_NonLocalBlockND variants), for tests/test_convert.py. Module and class names are theirs,
because nonlocal_kernels.convert recognises these blocks by structure and names."""
