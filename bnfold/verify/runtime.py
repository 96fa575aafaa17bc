"""onnxruntime sessions, unoptimised, and running them on numpy feeds."""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Mapping

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from bnfold.errors import BadInput, one_line
from bnfold.verify.inputs import tensors

Model = onnx.ModelProto | str | os.PathLike

_PROVIDERS = ["CPUExecutionProvider"]
_PROTOBUF_LIMIT = 2**31 - 1  # a ModelProto larger than this cannot be serialised to bytes
_EXTERNAL_DIR_KEY = "session.model_external_initializers_file_folder_path"
_ORT_ERRORS = (RuntimeError, ValueError) + tuple(  # onnxruntime's errors derive from Exception
    v for v in vars(ort.capi.onnxruntime_pybind11_state).values()
    if isinstance(v, type) and issubclass(v, Exception)
)


def session(model: Model, base_dir: str | os.PathLike | None, role: str,
            initializers: Mapping[str, np.ndarray] | None = None) -> ort.InferenceSession:
    """A session of ``model``; ``initializers`` (name -> array, kept alive by the caller) give
    the values of the model's placeholder tensors without copying them into its bytes."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    given = dict(initializers or {})
    if given:
        options.add_external_initializers(list(given), [_ort_value(a) for a in given.values()])
    try:
        if isinstance(model, onnx.ModelProto):
            return _session_from_proto(model, base_dir, options, role, set(given))
        # By path, onnxruntime finds external data itself, however large the model.
        return ort.InferenceSession(os.fspath(model), options, providers=_PROVIDERS)
    except (*_ORT_ERRORS, OSError) as err:
        raise BadInput(f"onnxruntime cannot load the {role}: {one_line(err)}") from None


def _session_from_proto(
    model: onnx.ModelProto,
    base_dir: str | os.PathLike | None,
    options: ort.SessionOptions,
    role: str,
    given: set[str] = frozenset(),
) -> ort.InferenceSession:
    external = any(t.data_location == TensorProto.EXTERNAL and t.name not in given
                   for t in tensors(model))
    if external and base_dir is None:
        raise BadInput(f"the {role} keeps tensors in external data files: base_dir is needed")
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


def run_session(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], what: str
) -> dict[str, np.ndarray]:
    values = {name: _ort_value(np.asarray(array)) for name, array in feeds.items()}
    try:
        results = session.run_with_ort_values(None, values)
    except _ORT_ERRORS as err:
        raise BadInput(f"onnxruntime failed to run {what}: {one_line(err)}") from None
    return {o.name: _to_numpy(r, o.name) for o, r in zip(session.get_outputs(), results)}


def _ort_value(array: np.ndarray) -> ort.OrtValue:
    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:  # numpy has no bfloat16: hand onnxruntime the bits
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            array.view(np.uint16), TensorProto.BFLOAT16
        )
    return ort.OrtValue.ortvalue_from_numpy(array)


def _to_numpy(value: ort.OrtValue, name: str) -> np.ndarray:
    if not value.is_tensor():
        raise BadInput(f"output '{name}' is not a tensor: only tensor outputs can be compared")
    if value.data_type() == "tensor(bfloat16)":  # OrtValue.numpy() refuses it: copy the bits
        raw = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
        return np.frombuffer(raw, np.uint16).view(ml_dtypes.bfloat16).reshape(value.shape())
    try:
        return value.numpy()
    except _ORT_ERRORS:
        raise BadInput(
            f"output '{name}' is {value.data_type()}, which bnfold cannot compare"
        ) from None
