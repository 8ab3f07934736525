"""Benchmarks of nonlocal_kernels: a CLI (python -m benchmarks) and a pytest-benchmark suite."""
