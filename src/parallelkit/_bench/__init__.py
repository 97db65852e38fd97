"""The benchmark suite behind ``python -m parallelkit bench`` and ``benchmarks/bench_map.py``.

Private: no name here is part of the public API.  Nothing is imported at package import, so
a worker that unpickles a task from :mod:`.tasks` pays for that module alone.
"""
