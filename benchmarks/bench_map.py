#!/usr/bin/env python3
"""Parallel map: parallelkit side by side with the standard library and peer libraries.

The front end of ``python -m benchmarks``: the workloads and contenders are in
:mod:`benchmarks.suite`, the runner in :mod:`benchmarks.harness`.  Run from a checkout
(``pip install -e '.[bench]'`` installs the peers, numpy and psutil).

* ``tiny``: 200,000 items of ``x*x`` -- nothing but per-item overhead;
* ``cpu``: 16 pure-Python tasks of ~0.1 s each -- speed-up over serial and efficiency;
* ``arrays``: 32 float64 arrays of 8 MB as arguments, ``float(a.sum())`` back, against data
  already in one ``SharedMemory`` segment (``shm_ideal``);
* ``arrays-results``: 32 tasks, each returns an 8 MB array made from a small argument;
* ``startup-2``, ``startup-8``: start W workers, each runs one trivial task, shut down --
  against W bare ``multiprocessing.Process``es; under spawn also ``startup-W-heavy``, with a
  ``__main__`` that imports numpy.

Every contender runs interleaved in one process, one-shot (create, map, shut down) and warm
(on a pool created before timing); peers (mpire, joblib, loky, pebble) join when
importable, numpy workloads are skipped without numpy.  Every result is checked.

Usage (``python -m benchmarks`` and ``python benchmarks/bench_map.py`` are the same)::

    python -m benchmarks                               # everything, full sizes, fork
    python -m benchmarks --quick                       # smaller sizes, 3 rounds
    python benchmarks/bench_map.py                     # everything, full sizes, fork
    python benchmarks/bench_map.py --quick             # smaller sizes, 3 rounds
    python benchmarks/bench_map.py --start-method spawn --json spawn.jsonl
    python benchmarks/bench_map.py --workloads arrays --only 'Pool|parallelkit' --rounds 9
    python benchmarks/bench_map.py --update-readme     # rewrite this start method's tables
    benchmarks/run_all.sh                              # every start method, results/ + README
"""

from __future__ import annotations

# Only the standard library at the top: spawn children import this script again.
import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    from benchmarks.settings import add_arguments

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(ap, start_method="fork")
    ap.add_argument("--json", metavar="PATH", help="write JSON lines here ('-': stdout)")
    ap.add_argument(
        "--render",
        metavar="PATH",
        help="measure nothing: print (and with --update-readme, store) the tables of a --json file",
    )
    ap.add_argument(
        "--update-readme",
        action="store_true",
        help=f"rewrite this start method's tables in {README.name}",
    )
    ap.add_argument(
        "--keep-dont-write-bytecode",
        action="store_true",
        help="measure with PYTHONDONTWRITEBYTECODE as set (see reexec_with_bytecode_cache)",
    )
    return ap, ap.parse_args(argv)


def _shown_command(argv: Sequence[str]) -> str:
    """The command line, less the options that only say where the output goes."""
    shown: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--json", "--render"):
            skip = True
            continue
        if arg == "--update-readme" or arg.startswith(("--json=", "--render=")):
            continue
        shown.append(arg)
    return " ".join(["python benchmarks/bench_map.py", *shown])


def render_saved(path: str, *, update_readme: bool) -> int:
    """``--render PATH``: tables from saved JSON lines, without measuring again."""
    from benchmarks import harness as h
    from benchmarks.suite import render

    meta, rows = h.rows_from_json(Path(path).read_text().splitlines())
    if not meta:
        raise SystemExit(f"{path}: no meta line; was it written by --json?")
    titles = {k: v.get("title", k) for k, v in (meta.get("workloads") or {}).items()}
    meta["command"] = _shown_command(meta.get("command", "").split()[2:])
    sections = [(key, titles.get(key, key), h.markdown_table(group)) for key, group in rows.items()]
    text = render(meta, sections)
    print(text)
    if update_readme:
        h.replace_between_markers(README, f"bench_map:{meta['start_method']}", text)
        h.log(f"# {README} updated ({meta['start_method']}) from {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap, args = parse_args(argv)
    if args.render:
        return render_saved(args.render, update_readme=args.update_readme)
    from benchmarks import harness as h
    from benchmarks import suite
    from benchmarks.settings import settings_from

    settings = settings_from(ap, args)
    if not args.keep_dont_write_bytecode:
        suite.reexec_with_bytecode_cache()
    command = _shown_command(sys.argv[1:] if argv is None else argv)
    meta = suite.new_meta(settings, benchmark="bench_map", command=command)

    # with --json -, stdout carries the JSON lines alone (the tables go to stderr)
    tables = sys.stderr if args.json == "-" else sys.stdout

    def show(key: str, title: str, table: str) -> None:
        print(f"\n**{key}** — {title}\n\n{table}\n", file=tables, flush=True)

    report = suite.run(settings, meta, on_table=show)
    for key, why in sorted((meta.get("skipped") or {}).items()):
        print(f"\n**{key}** — skipped: {why}.", file=tables)
    absent = sorted(meta.get("peers_missing") or {})
    if absent:
        print(
            f"\nNot installed, so not compared: {', '.join(absent)} (pip install -e '.[bench]')",
            file=tables,
        )
    if args.json:
        text = suite.json_text(report)
        if args.json == "-":
            sys.stdout.write(text)
        else:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text)
            h.log(f"# JSON lines written to {args.json}")
    if args.update_readme:
        key = f"bench_map:{settings.start_method}"
        h.replace_between_markers(README, key, suite.render(meta, report.sections))
        h.log(f"# {README} updated ({settings.start_method})")
    return 0


if __name__ == "__main__":
    # Run as a file, this folder heads sys.path; the package imports from the repository root
    # (spawn children re-import this script, which imports nothing of the package at the top)
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
