"""The stress run: rounds of scenarios under the schedule fuzzer, every start method.

Not part of the default run (``-m "not stress"`` in pyproject.toml); run it with::

    python -m pytest -m stress                                   # about 3 minutes
    PARALLELKIT_STRESS_SECONDS=1800 python -m pytest -m stress   # a soak

Each start method gets a third of ``PARALLELKIT_STRESS_SECONDS`` (default 180).  Round
``n`` of a start method runs one scenario of tests/stress/scenarios.py in a child
interpreter (the fuzzer is configured by the environment at import, so each round needs a
fresh one) with ``PARALLELKIT_FUZZ=SEED:MAX_MS:PERCENT``, where ``SEED`` and the
scenario's choices derive from the run seed, the start method and ``n``.  The run seed is
``PARALLELKIT_STRESS_SEED`` if set (CI sets a fixed one: the same rounds every run, as many
as time allows), else random; a failure prints the command that replays its round alone,
and ``PARALLELKIT_STRESS_SEED=...`` replays the whole run.  ``PARALLELKIT_STRESS_SCENARIOS``
(comma-separated names) restricts the run to some scenarios.

A round fails if the child exits non-zero (a wrong result, an unexpected error, a leak
after the round), writes anything to stderr (a traceback in a worker, the resource
tracker's complaints) or hangs (it then gets SIGUSR1 to dump its stacks, and its whole
process group is killed).  The test goes on with the next rounds and reports every failed
one at the end.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from child import package_env
from parallelkit import StartMethod
from parallelkit._util.context import available_start_methods
from parallelkit.testing import remove_stale_segments

HERE: Final = Path(__file__).resolve().parent
SCRIPT: Final = HERE / "scenarios.py"
SCENARIOS: Final = (
    "map",
    "map_kill",
    "map_timeout",
    "imap_close",
    "submit_storm",
    "pool_big",
    "idle_death",
    "leakcheck_pool",
    "pipeline",
    "queue",
    "channel",
    "shared",
)
SECONDS: Final = float(os.environ.get("PARALLELKIT_STRESS_SECONDS", "180"))
ROUND_TIMEOUT: Final = 150.0  # seconds before a round counts as hung
DUMP_WAIT: Final = 5.0  # seconds for a hung round to write its stacks after SIGUSR1
FUZZ_MAX_MS: Final = (0.5, 2.0, 5.0)  # longest delay at a race point, per round
FUZZ_PERCENT: Final = (10, 25, 50)  # share of passings that are delayed, per round


def _run_seed() -> str:
    return os.environ.get("PARALLELKIT_STRESS_SEED") or str(random.SystemRandom().randrange(10**9))


RUN_SEED: Final = _run_seed()


def _scenarios() -> tuple[str, ...]:
    chosen = os.environ.get("PARALLELKIT_STRESS_SCENARIOS")
    if not chosen:
        return SCENARIOS
    names = tuple(name.strip() for name in chosen.split(",") if name.strip())
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"PARALLELKIT_STRESS_SCENARIOS: unknown {unknown}; known: {SCENARIOS}")
    return names


@dataclass(frozen=True)
class Plan:
    """Round ``number`` of a start method: which scenario, with which seeds."""

    method: str
    number: int
    scenario: str
    seed: int
    fuzz: str

    @classmethod
    def of(cls, method: str, number: int, scenarios: tuple[str, ...]) -> Plan:
        digest = hashlib.blake2b(f"{RUN_SEED}|{method}|{number}".encode(), digest_size=8)
        seed = int.from_bytes(digest.digest(), "little") % 10**9
        rng = random.Random(seed)
        # every scenario once per cycle, in an order that changes from cycle to cycle
        cycle, position = divmod(number, len(scenarios))
        order = list(scenarios)
        random.Random(f"{RUN_SEED}|{method}|cycle {cycle}").shuffle(order)
        fuzz = f"{seed}:{rng.choice(FUZZ_MAX_MS)}:{rng.choice(FUZZ_PERCENT)}"
        return cls(method, number, order[position], seed, fuzz)

    def command(self) -> str:
        """The shell command that replays this round alone (from the repository root)."""
        return (
            f"PYTHONPATH=src:tests PARALLELKIT_FUZZ={self.fuzz} python "
            f"tests/stress/scenarios.py {self.scenario} {self.method} {self.seed}"
        )


def run_round(plan: Plan, log: Path) -> str | None:
    """Run one round in a child interpreter; ``None`` if it passed, else what went wrong."""
    env = package_env(str(HERE.parent), PARALLELKIT_FUZZ=plan.fuzz, PARALLELKIT_FUZZ_LOG=str(log))
    env.pop("PARALLELKIT_STRESS_SEED", None)
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT), plan.scenario, plan.method, str(plan.seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: a hung round is killed whole
    )
    hung = False
    try:
        out, err = child.communicate(timeout=ROUND_TIMEOUT)
    except subprocess.TimeoutExpired:
        hung = True
        child.send_signal(signal.SIGUSR1)  # dump every thread's stack (faulthandler)
        try:
            out, err = child.communicate(timeout=DUMP_WAIT)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = child.communicate()
        remove_stale_segments()  # what the killed round's processes left in /dev/shm
    if not hung and child.returncode == 0 and not err:
        return None
    if hung:
        what = f"hung for {ROUND_TIMEOUT:.0f} s (stacks below)"
    elif child.returncode != 0:
        what = f"exit status {child.returncode}"
    else:
        what = "passed, but wrote to stderr"
    return (
        f"round {plan.number} ({plan.scenario}, {plan.method}, run seed {RUN_SEED}): {what}\n"
        f"replay: {plan.command()}\n"
        f"fuzz log: {log}\n"
        f"--- stdout\n{out[-4000:]}--- stderr\n{err[-12000:]}"
    )


@pytest.mark.stress
@pytest.mark.timeout(SECONDS / 3 + ROUND_TIMEOUT + DUMP_WAIT + 60)
@pytest.mark.parametrize("method", available_start_methods())
def test_stress(method: StartMethod, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenarios = _scenarios()
    budget = SECONDS / 3
    start = time.monotonic()
    failures: list[str] = []
    done: dict[str, int] = {}
    number = 0
    while number == 0 or time.monotonic() - start < budget:
        plan = Plan.of(method, number, scenarios)
        failure = run_round(plan, tmp_path / f"fuzz-{number}.log")
        if failure is not None:
            failures.append(failure)
        done[plan.scenario] = done.get(plan.scenario, 0) + 1
        number += 1
    elapsed = time.monotonic() - start
    summary = (
        f"stress {method}: {number - len(failures)} of {number} rounds clean in "
        f"{elapsed:.0f} s (run seed {RUN_SEED}; rounds per scenario {done})"
    )
    with capsys.disabled():
        print(f"\n{summary}")
    if failures:
        again = (
            f"the whole run again: PARALLELKIT_STRESS_SEED={RUN_SEED} "
            f"PARALLELKIT_STRESS_SECONDS={SECONDS:g} python -m pytest -m stress -k {method}"
        )
        pytest.fail(f"{summary}\n{again}\n\n" + "\n\n".join(failures), pytrace=False)
