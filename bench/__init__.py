"""``make bench``: side-by-side benchmarks of the naive and the shared-prefix paths (``python -m bench.run``).

Each section measures both sides in one run on the same model and writes a table and a plot into
``docs/benchmarks.md``; nothing here asserts a threshold (see ``bench.run``).
"""
