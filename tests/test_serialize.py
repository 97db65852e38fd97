"""_serialize: sending functions (with and without cloudpickle) and exceptions across processes."""

from __future__ import annotations

import pickle
import sys
import threading
import types
from collections.abc import Callable
from multiprocessing.context import SpawnContext
from typing import cast

import pytest

import tasks.serialize as helpers
from parallelkit import StartMethod
from parallelkit._util.context import get_context
from parallelkit._wire import codec as _serialize
from parallelkit._wire.codec import (
    ExceptionRecord,
    RemoteTraceback,
    capture_exception,
    dump_function,
    dumps,
    locate_unpicklable,
    rebuild_exception,
)
from parallelkit.errors import RemoteError, SerializationError


@pytest.fixture
def without_cloudpickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behave as if cloudpickle were not installed."""
    monkeypatch.setattr(_serialize, "_cloudpickle", lambda: None)


def _make_closure(offset: int) -> Callable[[int], int]:
    def add_offset(x: int) -> int:
        return x + offset

    return add_offset


def _main_function() -> Callable[[int], int]:
    """A function that claims to live in ``__main__``, as a script's functions do."""
    fn = types.FunctionType(helpers.double.__code__, {}, "double_in_main")
    fn.__module__ = "__main__"
    fn.__qualname__ = "double_in_main"
    return fn


def _load(payload: bytes) -> Callable[[int], int]:
    fn: Callable[[int], int] = pickle.loads(payload)
    return fn


# ------------------------------------------------------------------------------ dumps


def test_dumps_uses_plain_pickle_for_what_it_can() -> None:
    assert pickle.loads(dumps({"a": [1, 2.5, None]})) == {"a": [1, 2.5, None]}


def test_dumps_falls_back_to_cloudpickle() -> None:
    pytest.importorskip("cloudpickle")
    assert _load(dumps(lambda x: x * 3))(2) == 6


def test_dumps_without_cloudpickle_raises_the_pickling_error(without_cloudpickle: None) -> None:
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        dumps(lambda x: x)


# ------------------------------------------------------------------------------ dump_function


def test_top_level_function_is_sent_by_reference() -> None:
    payload = dump_function(helpers.double)
    assert pickle.loads(payload) is helpers.double
    assert b"double" in payload


def test_builtin_is_sent_by_reference(without_cloudpickle: None) -> None:
    assert pickle.loads(dump_function(abs)) is abs


def test_lambda_is_sent_with_cloudpickle() -> None:
    pytest.importorskip("cloudpickle")
    assert _load(dump_function(lambda x: x + 1))(1) == 2


def test_closure_is_sent_with_cloudpickle() -> None:
    pytest.importorskip("cloudpickle")
    assert _load(dump_function(_make_closure(10)))(5) == 15


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: lambda x: x, "<lambda>"),
        (lambda: _make_closure(1), "_make_closure.<locals>.add_offset"),
    ],
    ids=["lambda", "closure"],
)
def test_without_cloudpickle_the_error_says_what_and_how_to_fix(
    without_cloudpickle: None, make: Callable[[], object], name: str
) -> None:
    with pytest.raises(SerializationError) as info:
        dump_function(make())
    error = info.value
    assert isinstance(error, TypeError)
    assert error.what == "function"
    assert error.item_index is None
    message = str(error)
    assert name in message
    assert "cannot send the function" in message
    assert "pip install 'parallelkit[cloudpickle]'" in message
    assert "top level of an importable module" in message
    assert error.__cause__ is not None  # the pickling error itself


def test_initializer_is_named_as_such(without_cloudpickle: None) -> None:
    with pytest.raises(SerializationError, match="cannot send the initializer") as info:
        dump_function(lambda: None, what="initializer")
    assert info.value.what == "initializer"


def test_main_function_travels_by_value_when_workers_cannot_import_main(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("cloudpickle")
    monkeypatch.setattr(_serialize, "_main_is_importable", lambda: False)
    fn = _main_function()
    payload = dump_function(fn, by_value=True)
    # By value: the bytes carry the code, not a reference to __main__.double_in_main.
    assert _load(payload)(21) == 42


def test_main_function_without_cloudpickle_says_why(
    monkeypatch: pytest.MonkeyPatch, without_cloudpickle: None
) -> None:
    monkeypatch.setattr(_serialize, "_main_is_importable", lambda: False)
    with pytest.raises(SerializationError) as info:
        dump_function(_main_function(), by_value=True)
    message = str(info.value)
    assert "double_in_main" in message
    assert "__main__" in message
    assert "cloudpickle" in message


def test_unsendable_even_with_cloudpickle_says_so() -> None:
    pytest.importorskip("cloudpickle")
    lock = threading.Lock()

    def holds_lock(x: int) -> int:
        with lock:
            return x

    with pytest.raises(SerializationError, match="even with cloudpickle") as info:
        dump_function(holds_lock)
    assert "holds_lock" in str(info.value)
    assert info.value.what == "function"


# ------------------------------------------------------------------------------ exceptions


def _captured(exc: BaseException) -> ExceptionRecord:
    """Raise ``exc`` for real (so it has a traceback) and capture it."""
    try:
        helpers.raise_it(exc)
    except BaseException as raised:
        return capture_exception(raised)
    raise AssertionError("raise_it returned")  # pragma: no cover


def test_builtin_exception_is_rebuilt_with_its_type() -> None:
    record = _captured(ValueError("bad value", 42))
    assert record.type_name == "ValueError"
    assert record.message == "('bad value', 42)"
    exc = rebuild_exception(record, where="in worker pid 1 on item 0")
    assert type(exc) is ValueError
    assert exc.args == ("bad value", 42)


def test_rebuilt_exception_has_the_remote_traceback_as_cause_and_a_note() -> None:
    record = _captured(KeyError("k"))
    exc = rebuild_exception(record, where="in worker pid 123 on item 7")
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "raise_it" in str(exc.__cause__)  # the function that raised, from the worker
    assert "KeyError" in str(exc.__cause__)
    assert exc.__notes__ == ["parallelkit: raised in worker pid 123 on item 7"]


def test_exception_with_required_constructor_args_keeps_its_attributes() -> None:
    record = _captured(helpers.NeedsArgs(404, "not found"))
    assert record.type_name == "tasks.serialize.NeedsArgs"
    exc = rebuild_exception(record, where="here")
    assert type(exc) is helpers.NeedsArgs
    assert exc.code == 404
    assert exc.reason == "not found"
    assert str(exc) == "code 404: not found"


def test_keyword_only_constructor_is_rebuilt() -> None:
    exc = rebuild_exception(_captured(helpers.KeywordOnly(limit=3)), where="here")
    assert type(exc) is helpers.KeywordOnly
    assert exc.limit == 3


def test_notes_added_in_the_worker_are_kept() -> None:
    original = ValueError("v")
    original.add_note("first note")
    exc = rebuild_exception(_captured(original), where="there")
    assert exc.__notes__ == ["first note", "parallelkit: raised there"]


def test_system_exit_keeps_its_code() -> None:
    exc = rebuild_exception(_captured(SystemExit(3)), where="here")
    assert type(exc) is SystemExit
    assert exc.code == 3


def test_unpicklable_exception_arrives_as_remote_error() -> None:
    record = _captured(helpers.HoldsLock("cannot cross"))
    assert record.payload is None
    exc = rebuild_exception(record, where="in worker pid 9 on item 2")
    assert isinstance(exc, RemoteError)
    assert exc.type_name == "tasks.serialize.HoldsLock"
    assert "cannot cross" in str(exc)
    assert "raise_it" in exc.remote_traceback
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert exc.__notes__ == ["parallelkit: raised in worker pid 9 on item 2"]


def test_exception_whose_class_is_missing_here_arrives_as_remote_error() -> None:
    # As when the worker raised a class from a module the parent never imported.
    payload = pickle.dumps(
        (helpers.NeedsArgs, (1, "x"), {}, None), protocol=pickle.HIGHEST_PROTOCOL
    ).replace(b"tasks.serialize", b"no_such_package")
    record = ExceptionRecord("no_such_package.NeedsArgs", "code 1: x", "Traceback\n", payload)
    exc = rebuild_exception(record, where="here")
    assert isinstance(exc, RemoteError)
    assert exc.type_name == "no_such_package.NeedsArgs"
    assert exc.remote_traceback == "Traceback\n"
    assert str(exc) == "no_such_package.NeedsArgs: code 1: x"


def test_payload_that_is_not_an_exception_arrives_as_remote_error() -> None:
    payload = pickle.dumps((dict, (), {}, None))
    record = ExceptionRecord("dict", "{}", "", payload)
    assert isinstance(rebuild_exception(record, where="here"), RemoteError)


def test_broken_str_does_not_break_capture() -> None:
    record = _captured(helpers.BrokenStr())
    assert "str() failed" in record.message
    assert type(rebuild_exception(record, where="here")) is helpers.BrokenStr


def test_records_pickle() -> None:
    record = _captured(helpers.NeedsArgs(1, "one"))
    assert pickle.loads(pickle.dumps(record)) == record


def test_exception_captured_in_a_worker_is_rebuilt_here(start_method: StartMethod) -> None:
    """The real thing: capture in a child process, send the record back, rebuild here."""
    # typeshed types get_context(<a StartMethod variable>) as BaseContext, which has no
    # Process attribute; each concrete context has one, with the same signature.
    ctx = cast(SpawnContext, get_context(start_method))
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(target=helpers.capture_in_child, args=(writer, 500, "in child"))
    try:
        process.start()
        writer.close()
        assert reader.poll(60), "the child sent nothing"
        record = reader.recv()
    finally:
        process.join(timeout=60)
        reader.close()
    assert process.exitcode == 0
    exc = rebuild_exception(record, where=f"in worker pid {process.pid}")
    assert type(exc) is helpers.NeedsArgs
    assert (exc.code, exc.reason) == (500, "in child")
    assert "capture_in_child" in str(exc.__cause__)


# ------------------------------------------------------------------------------ pre-flight


def test_locate_unpicklable_finds_the_first_bad_item(without_cloudpickle: None) -> None:
    found = locate_unpicklable([1, "two", threading.Lock(), threading.Lock()])
    assert found is not None
    position, error = found
    assert position == 2
    assert isinstance(error, TypeError)


def test_locate_unpicklable_returns_none_when_all_pickle() -> None:
    assert locate_unpicklable((1, [2], {"three": 3})) is None
    assert locate_unpicklable([]) is None


def test_main_is_importable_under_pytest() -> None:
    assert _serialize._main_is_importable() == bool(
        getattr(sys.modules["__main__"], "__file__", None)
        or getattr(sys.modules["__main__"], "__spec__", None)
    )
