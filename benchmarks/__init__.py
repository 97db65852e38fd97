"""parallelkit's benchmark suite: run from a checkout of the repository, never installed.

``python -m benchmarks`` is the parallel-map comparison with the standard library and the
peer libraries (``bench_map.py``); the other ``bench_*.py`` scripts measure pipelines,
channels, shared memory, progress and the other backends.  See ``README.md`` here.

Nothing is imported at package import, so a worker that unpickles a task from :mod:`.tasks`
pays for that module alone.
"""
