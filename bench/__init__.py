"""fastjepa benchmarks: ``python -m bench --suite kernels|all [--quick]`` (see bench/common.py)."""
