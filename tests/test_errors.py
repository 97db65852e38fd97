"""parallelkit.errors: the tree, the builtins each error also is, and faithful pickling."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

import parallelkit
from parallelkit import errors
from parallelkit.errors import (
    ChannelClosedError,
    ParallelKitError,
    PipelineError,
    QueueClosedError,
    RemoteError,
    SerializationError,
    StartMethodError,
    TaskTimeoutError,
    WorkerCrashedError,
)

# One instance of each error, with every attribute set to something recognisable.
SAMPLES: list[ParallelKitError] = [
    ParallelKitError("base"),
    StartMethodError("unknown start method 'frok'"),
    SerializationError("cannot send it", what="argument", item_index=3),
    WorkerCrashedError("worker died", item_index=7, pid=1234, exitcode=-9, signal="SIGKILL"),
    TaskTimeoutError("too slow", item_index=2, timeout=0.5),
    RemoteError("Weird: no", type_name="mod.Weird", remote_traceback="Traceback ...\n"),
    PipelineError("stage failed", stage="parse", item={"line": 3}, item_index=3),
    ChannelClosedError("the other end is gone"),
    QueueClosedError("every producer closed the queue"),
]

# The builtin each error also is, so that ``except ValueError`` and friends keep working.
BUILTINS: dict[type[ParallelKitError], tuple[type[BaseException], ...]] = {
    StartMethodError: (ValueError,),
    SerializationError: (TypeError,),
    TaskTimeoutError: (TimeoutError, OSError),
    ChannelClosedError: (EOFError,),
    QueueClosedError: (EOFError,),
    WorkerCrashedError: (),
    RemoteError: (),
    PipelineError: (),
}


def _roundtrip(exc: BaseException) -> BaseException:
    copy: BaseException = pickle.loads(pickle.dumps(exc, pickle.HIGHEST_PROTOCOL))
    return copy


@pytest.mark.parametrize("exc", SAMPLES, ids=lambda e: type(e).__name__)
def test_every_error_pickles_with_its_attributes(exc: ParallelKitError) -> None:
    copy = _roundtrip(exc)
    assert type(copy) is type(exc)
    assert copy.args == exc.args
    assert str(copy) == str(exc)
    assert vars(copy) == vars(exc)


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_pickling_works_with_every_protocol(protocol: int) -> None:
    exc = WorkerCrashedError("died", item_index=1, pid=2, exitcode=-11, signal="SIGSEGV")
    copy = pickle.loads(pickle.dumps(exc, protocol))
    assert isinstance(copy, WorkerCrashedError)
    assert (copy.item_index, copy.pid, copy.exitcode, copy.signal) == (1, 2, -11, "SIGSEGV")


def test_notes_survive_pickling() -> None:
    exc = TaskTimeoutError("too slow", item_index=4, timeout=1.0)
    exc.add_note("while running item 4")
    copy = _roundtrip(exc)
    assert copy.__notes__ == ["while running item 4"]


@given(
    message=st.text(),
    item_index=st.none() | st.integers(min_value=0),
    pid=st.none() | st.integers(min_value=1),
    exitcode=st.none() | st.integers(min_value=-64, max_value=255),
    signal=st.none() | st.sampled_from(["SIGKILL", "SIGSEGV", "SIGTERM"]),
)
def test_worker_crashed_error_roundtrips_any_values(
    message: str, item_index: int | None, pid: int | None, exitcode: int | None, signal: str | None
) -> None:
    exc = WorkerCrashedError(
        message, item_index=item_index, pid=pid, exitcode=exitcode, signal=signal
    )
    copy = _roundtrip(exc)
    assert isinstance(copy, WorkerCrashedError)
    assert vars(copy) == vars(exc)
    assert copy.args == (message,)


@given(what=st.sampled_from(["function", "argument", "result", "initializer"]))
def test_serialization_error_keeps_what(what: errors.SerializedWhat) -> None:
    copy = _roundtrip(SerializationError("x", what=what))
    assert isinstance(copy, SerializationError)
    assert copy.what == what
    assert copy.item_index is None


@pytest.mark.parametrize("cls", sorted(BUILTINS, key=str), ids=lambda c: getattr(c, "__name__", ""))
def test_every_error_is_a_parallelkit_error_and_its_builtin(cls: type[ParallelKitError]) -> None:
    assert issubclass(cls, ParallelKitError)
    assert issubclass(cls, Exception)
    for builtin in BUILTINS[cls]:
        assert issubclass(cls, builtin), f"{cls.__name__} should also be a {builtin.__name__}"


def test_catching_the_builtin_catches_the_error() -> None:
    with pytest.raises(ValueError, match="frok"):
        raise StartMethodError("unknown start method 'frok'")
    with pytest.raises(TimeoutError):
        raise TaskTimeoutError("late", item_index=0, timeout=1.0)
    with pytest.raises(EOFError):
        raise ChannelClosedError("gone")
    with pytest.raises(TypeError):
        raise SerializationError("cannot send", what="result", item_index=0)


def test_every_public_error_is_covered_here() -> None:
    public = {getattr(errors, name) for name in errors.__all__}
    assert public == {type(e) for e in SAMPLES}
    assert set(BUILTINS) == public - {ParallelKitError}


def test_errors_all_is_a_sorted_tuple() -> None:
    assert isinstance(errors.__all__, tuple)
    assert list(errors.__all__) == sorted(errors.__all__)


def test_tree_is_drawn_in_the_module_docstring() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        assert name in doc, f"{name} is missing from the tree in errors.__doc__"


def test_errors_are_reexported_from_the_package() -> None:
    for name in errors.__all__:
        assert getattr(parallelkit, name) is getattr(errors, name)
