"""blockd's benchmark suite: blockd against qemu-storage-daemon, side by side (issue 6).

Run ``python -m benchmarks.run --quick`` from the repository root; see benchmarks/README.md.
"""
