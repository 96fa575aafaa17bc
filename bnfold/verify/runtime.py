"""onnxruntime sessions, unoptimised, and running them on numpy feeds.

onnxruntime is imported on the first session, not with bnfold: `inspect` and `fold --no-verify`
do not pay for it. Its log lines stay off stderr unless ``verbose``; its error messages reach the
user whole (all their lines joined), since the part that explains sits after the first line.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Mapping
from functools import cache

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto

from bnfold.errors import BadInput
from bnfold.verify.inputs import tensors

Model = onnx.ModelProto | str | os.PathLike

_PROVIDERS = ["CPUExecutionProvider"]
_PROTOBUF_LIMIT = 2**31 - 1  # a ModelProto larger than this cannot be serialised to bytes
_EXTERNAL_DIR_KEY = "session.model_external_initializers_file_folder_path"
_QUIET, _WARNINGS = 4, 2  # onnxruntime's log severities: FATAL only, and its default


class RunFailed(Exception):
    """onnxruntime could not run a model on some feeds; ``str`` is its whole message."""


@cache
def _ort():
    import onnxruntime
    onnxruntime.set_default_logger_severity(_QUIET)
    return onnxruntime


@cache
def _ort_errors() -> tuple[type[BaseException], ...]:
    ort = _ort()  # onnxruntime's errors derive from Exception
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
    _ort().set_default_logger_severity(_WARNINGS if verbose else _QUIET)


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
    ort = _ort()
    set_verbose(verbose)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = _WARNINGS if verbose else _QUIET
    given = dict(initializers or {})
    try:
        if given:
            options.add_external_initializers(list(given),
                                              [_ort_value(a) for a in given.values()])
        if isinstance(model, onnx.ModelProto):
            return _session_from_proto(model, base_dir, options, set(given))
        # By path, onnxruntime finds external data itself, however large the model.
        return ort.InferenceSession(os.fspath(model), options, providers=_PROVIDERS)
    except (*_ort_errors(), OSError) as err:
        raise RunFailed(message(err)) from None


def _session_from_proto(model: onnx.ModelProto, base_dir: str | os.PathLike | None, options,
                        given: set[str] = frozenset()):
    ort = _ort()
    external = any(t.data_location == TensorProto.EXTERNAL and t.name not in given
                   for t in tensors(model))
    if external and base_dir is None:
        raise BadInput("a model keeps tensors in external data files: base_dir is needed")
    if model.ByteSize() <= _PROTOBUF_LIMIT:
        if external:
            options.add_session_config_entry(_EXTERNAL_DIR_KEY, os.path.abspath(base_dir))
        return ort.InferenceSession(model.SerializeToString(), options, providers=_PROVIDERS)
    # Too large to serialise: save a copy with all its tensors external and load it by path.
    # Rare (the CLI verifies saved files) and costly: the copy holds every tensor in memory.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        if external:
            onnx.load_external_data_for_model(copy, os.fspath(base_dir))
        path = os.path.join(tmp, "model.onnx")
        onnx.save(copy, path, save_as_external_data=True, location="model.onnx.data")
        del copy
        return ort.InferenceSession(path, options, providers=_PROVIDERS)


def run_session(session, feeds: Mapping[str, object]) -> dict[str, object]:
    """Outputs by name: arrays, lists of arrays (sequences), None (empty optionals), dicts (maps).

    RunFailed with onnxruntime's whole message if the model cannot run on ``feeds``.
    """
    try:
        if (all(isinstance(a, np.ndarray) and a.dtype.kind != "O" for a in feeds.values())
                and all(o.type.startswith("tensor(") for o in session.get_outputs())):
            values = {name: _ort_value(array) for name, array in feeds.items()}
            results = session.run_with_ort_values(None, values)
            return {o.name: _to_numpy(r, o.name)
                    for o, r in zip(session.get_outputs(), results)}
        results = session.run(None, dict(feeds))  # strings, sequences, optionals, maps
    except _ort_errors() as err:
        raise RunFailed(message(err)) from None
    return {o.name: r for o, r in zip(session.get_outputs(), results)}


def _ort_value(array: np.ndarray):
    ort = _ort()
    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:  # numpy has no bfloat16: hand onnxruntime the bits
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            array.view(np.uint16), TensorProto.BFLOAT16
        )
    return ort.OrtValue.ortvalue_from_numpy(array)


def _to_numpy(value, name: str):
    if value.data_type() == "tensor(bfloat16)":  # OrtValue.numpy() refuses it: copy the bits
        raw = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
        return np.frombuffer(raw, np.uint16).view(ml_dtypes.bfloat16).reshape(value.shape())
    try:
        return value.numpy()
    except _ort_errors():
        raise BadInput(
            f"output '{name}' is {value.data_type()}, which bnfold cannot compare"
        ) from None
