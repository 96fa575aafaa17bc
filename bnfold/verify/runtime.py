"""onnxruntime sessions, unoptimised, and running them on numpy feeds.

onnxruntime is imported on the first session, not with bnfold: `inspect` and `fold --no-verify`
do not pay for it. Its log lines stay off stderr unless ``verbose``; its error messages reach the
user whole (all their lines joined), since the part that explains sits after the first line.
"""

from __future__ import annotations

import ctypes
import os
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto

from bnfold.errors import BadInput
from bnfold.wire import read_external_data, tensors

Model = onnx.ModelProto | str | os.PathLike

_PROVIDERS = ["CPUExecutionProvider"]
_PROTOBUF_LIMIT = 2**31 - 1  # a ModelProto larger than this cannot be serialised to bytes
EXTERNAL_DIR_KEY = "session.model_external_initializers_file_folder_path"
_QUIET, _WARNINGS = 4, 2  # onnxruntime's log severities: FATAL only, and its default


class RunFailed(Exception):
    """onnxruntime could not run a model on some feeds; ``str`` is its whole message."""


@cache
def ort_module():
    """onnxruntime, imported on first use (importing bnfold does not load it), its own log
    quiet."""
    import onnxruntime
    onnxruntime.set_default_logger_severity(_QUIET)
    return onnxruntime


@cache
def ort_errors() -> tuple[type[BaseException], ...]:
    """The exceptions onnxruntime raises when it cannot load or run a model."""
    ort = ort_module()  # onnxruntime's errors derive from Exception
    return (RuntimeError, ValueError, TypeError) + tuple(
        v for v in vars(ort.capi.onnxruntime_pybind11_state).values()
        if isinstance(v, type) and issubclass(v, Exception)
    )


def message(err: BaseException) -> str:
    """An onnxruntime error as one line, whole."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def set_verbose(verbose: bool) -> None:
    """Let onnxruntime's own warnings through to stderr (they are off by default)."""
    ort_module().set_default_logger_severity(_WARNINGS if verbose else _QUIET)


def session(model: Model, base_dir: str | os.PathLike | None, role: str, *,
            verbose: bool = False, initializers: Mapping[str, np.ndarray] | None = None):
    """An unoptimised CPU session; BadInput with onnxruntime's whole message if it cannot load.

    ``initializers`` (name -> array, kept alive by the caller) give the values of the model's
    placeholder tensors without copying them into its bytes."""
    try:
        return load_session(model, base_dir, verbose=verbose, initializers=initializers)
    except RunFailed as err:
        raise BadInput(f"onnxruntime cannot load the {role}: {err}") from None


def load_session(model: Model, base_dir: str | os.PathLike | None, *, verbose: bool = False,
                 initializers: Mapping[str, np.ndarray] | None = None):
    """As `session`, raising RunFailed (or BadInput for a missing base_dir)."""
    if not isinstance(model, onnx.ModelProto) and not initializers:
        ahead = _taken_ahead(model, verbose)
        if ahead is not None:
            return ahead.result()
    return _load_session(model, base_dir, verbose, initializers)


class _Ahead:
    """A session of a model file being built on a thread (onnxruntime builds it without the
    GIL), while the caller does other work."""

    def __init__(self, path: str, verbose: bool):
        self.verbose = verbose
        self._session = self._error = None
        self._thread = threading.Thread(target=self._build, args=(path,), daemon=True,
                                        name="bnfold-session-ahead")
        self._thread.start()

    def _build(self, path: str) -> None:
        # This thread too leaves SIGINT and SIGTERM to the main thread, which acts on them.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
        try:
            self._session = _load_session(path, None, self.verbose, None)
        except BaseException as err:  # handed to the caller, in its thread
            self._error = err

    def wait(self) -> None:
        self._thread.join()

    def result(self):
        self.wait()
        if self._error is not None:
            raise self._error
        return self._session


_AHEAD: dict[str, _Ahead] = {}
_AHEAD_LOCK = threading.Lock()


@contextmanager
def session_ahead(path: str | os.PathLike, verbose: bool = False) -> Iterator[None]:
    """Start building the session of the model file at ``path`` now; the first `load_session`
    of that path (same ``verbose``, no ``initializers``) within the block takes it instead of
    building one. The file must not change in the meantime. What is not taken is dropped at
    the end of the block, once built: a process that exits while onnxruntime builds a session
    on another thread is aborted by the C++ runtime ("terminate called without an active
    exception")."""
    key = os.path.abspath(os.fspath(path))
    ort_module()  # imported here, not on the thread
    ahead = _Ahead(key, verbose)
    with _AHEAD_LOCK:
        _AHEAD[key] = ahead
    try:
        yield
    finally:
        with _AHEAD_LOCK:
            if _AHEAD.get(key) is ahead:
                del _AHEAD[key]
        ahead.wait()


def _taken_ahead(path: str | os.PathLike, verbose: bool) -> _Ahead | None:
    key = os.path.abspath(os.fspath(path))
    with _AHEAD_LOCK:
        ahead = _AHEAD.get(key)
        if ahead is None or ahead.verbose != verbose:
            return None
        del _AHEAD[key]
    return ahead


_STOPS = {signal.SIGINT, signal.SIGTERM}


def new_session(source: str | bytes, options):
    """onnxruntime's CPU InferenceSession of `source` (a path or a model's bytes), built with
    SIGINT and SIGTERM blocked in this thread, so that the worker threads onnxruntime starts
    block them too (they inherit the mask of the thread that starts them). Otherwise the kernel
    may hand such a signal to one of them (they spin, waiting for work): Python then acts on it
    only when the main thread next runs Python code, long after if it waits in a blocking call.
    A signal arriving during the build waits until its end."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        return ort_module().InferenceSession(source, options, providers=_PROVIDERS)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _load_session(model: Model, base_dir: str | os.PathLike | None, verbose: bool,
                  initializers: Mapping[str, np.ndarray] | None):
    ort = ort_module()
    set_verbose(verbose)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = _WARNINGS if verbose else _QUIET
    given = dict(initializers or {})
    try:
        if given:
            options.add_external_initializers(list(given),
                                              [ort_value(a) for a in given.values()])
        if isinstance(model, onnx.ModelProto):
            return _session_from_proto(model, base_dir, options, set(given))
        # By path, onnxruntime finds external data itself, however large the model.
        return new_session(os.fspath(model), options)
    except (*ort_errors(), OSError) as err:
        raise RunFailed(message(err)) from None


def _session_from_proto(model: onnx.ModelProto, base_dir: str | os.PathLike | None, options,
                        given: set[str] = frozenset()):
    external = any(t.data_location == TensorProto.EXTERNAL and t.name not in given
                   for t in tensors(model))
    if external and base_dir is None:
        raise BadInput("a model keeps tensors in external data files: base_dir is needed")
    if model.ByteSize() <= _PROTOBUF_LIMIT:
        if external:
            options.add_session_config_entry(EXTERNAL_DIR_KEY, os.path.abspath(base_dir))
        return new_session(model.SerializeToString(), options)
    # Too large to serialise: save a copy with all its tensors external and load it by path.
    # Rare (the CLI verifies saved files) and costly: the copy holds every tensor in memory.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        if external:
            read_external_data(copy, base_dir)
        path = os.path.join(tmp, "model.onnx")
        onnx.save(copy, path, save_as_external_data=True, location="model.onnx.data")
        del copy
        return new_session(path, options)


def run_session(session, feeds: Mapping[str, object]) -> dict[str, object]:
    """Outputs by name: arrays, lists of arrays (sequences), None (empty optionals), dicts (maps).

    RunFailed with onnxruntime's whole message if the model cannot run on ``feeds``.
    """
    try:
        if (all(isinstance(a, np.ndarray) and a.dtype.kind != "O" for a in feeds.values())
                and all(o.type.startswith("tensor(") for o in session.get_outputs())):
            values = {name: ort_value(array) for name, array in feeds.items()}
            results = session.run_with_ort_values(None, values)
            return {o.name: ort_to_numpy(r, o.name)
                    for o, r in zip(session.get_outputs(), results)}
        results = session.run(None, dict(feeds))  # strings, sequences, optionals, maps
    except ort_errors() as err:
        raise RunFailed(message(err)) from None
    return {o.name: r for o, r in zip(session.get_outputs(), results)}


def ort_value(array: np.ndarray):
    """`array` as an OrtValue (bfloat16 too, which numpy knows only through ml_dtypes)."""
    ort = ort_module()
    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:  # numpy has no bfloat16: hand onnxruntime the bits
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            array.view(np.uint16), TensorProto.BFLOAT16
        )
    return ort.OrtValue.ortvalue_from_numpy(array)


def ort_to_numpy(value, name: str):
    """An OrtValue (output `name`) as an array; BadInput for types numpy cannot hold."""
    if value.data_type() == "tensor(bfloat16)":  # OrtValue.numpy() refuses it: copy the bits
        raw = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
        return np.frombuffer(raw, np.uint16).view(ml_dtypes.bfloat16).reshape(value.shape())
    try:
        return value.numpy()
    except ort_errors():
        raise BadInput(
            f"output '{name}' is {value.data_type()}, which bnfold cannot compare"
        ) from None
