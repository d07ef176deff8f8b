"""svmotion benchmark suite (issue 4): the mirror node measured side by side with its peers.

Run `python -m benchmarks --out bench` (what `make bench` does). See benchmarks/__main__.py.
"""
