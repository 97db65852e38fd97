"""``python -m parallelkit bench``: the parallel-map comparison on the user's own machine."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from .options import add_arguments


def add_bench_arguments(ap: argparse.ArgumentParser, *, start_method: str) -> None:
    """The ``bench`` subcommand's options (the size knobs work but stay out of --help)."""
    add_arguments(ap, start_method=start_method, hide_sizes=True)
    ap.add_argument(
        "--json",
        action="store_true",
        help="print JSON lines (a meta record, then one record a result) instead of tables",
    )


def run_bench(
    ap: argparse.ArgumentParser, args: argparse.Namespace, out: TextIO = sys.stdout
) -> int:
    """Measure, then print markdown tables (or, with ``--json``, JSON lines) to ``out``."""
    from . import suite  # the contenders import concurrent.futures and more: only when asked
    from .settings import settings_from

    settings = settings_from(ap, args)
    shown = ["python -m parallelkit bench"]
    shown += ["--quick"] if args.quick else []
    shown += [f"--start-method {settings.start_method}"]
    meta = suite.new_meta(settings, benchmark="parallelkit bench", command=" ".join(shown))

    def table(key: str, title: str, text: str) -> None:
        if not args.json:
            print(f"\n**{key}** — {title}\n\n{text}", file=out, flush=True)

    report = suite.run(settings, meta, on_table=table)
    if args.json:
        out.write(suite.json_text(report))
    else:
        for key, why in sorted((meta.get("skipped") or {}).items()):
            print(f"\n**{key}** — skipped: {why}.", file=out)
        absent = sorted(meta.get("peers_missing") or {})
        if absent:
            print(
                "\nNot installed, so not compared: "
                + ", ".join(absent)
                + " (pip install 'parallelkit[bench]')",
                file=out,
            )
        print(
            "\nRatios are paired round by round; 'x best peer' compares with the fastest "
            "stdlib or peer contender in the same mode (below 1 is faster).",
            file=out,
        )
    out.flush()
    return 0
