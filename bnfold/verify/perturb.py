"""Models with their weights moved by one ulp: how far rounding a model's weights moves its
outputs (the criterion's allowance, and its estimate of a model's own rounding error)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.graph import FLOAT_TYPES, is_external, tensor_value
from bnfold.nodes import graphs


def perturbed(array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``array`` with every element moved by one ulp of its dtype, up or down at random."""
    dtype = array.dtype
    info = ml_dtypes.finfo(dtype)
    a = array.astype(np.float64)
    with np.errstate(divide="ignore"):
        exponent = np.maximum(np.floor(np.log2(np.abs(a))), info.minexp)
    ulp = np.exp2(exponent - info.nmant)
    moved = a + np.where(rng.random(a.shape) < 0.5, -ulp, ulp)
    limit = float(info.max)
    return np.where(np.isfinite(a), np.clip(moved, -limit, limit), a).astype(dtype)


def rewritten(original: onnx.ModelProto, original_dir: str, candidate: onnx.ModelProto,
              candidate_dir: str) -> set[str]:
    """The float initializers of ``candidate`` that ``original`` does not have as they are
    (new names, or a fold's new weight under its old name). External tensors are read one pair
    at a time to compare them."""
    known = {t.name: t for g in graphs(original.graph) for t in g.initializer}
    names = set()
    for g in graphs(candidate.graph):
        for t in g.initializer:
            if t.data_type in FLOAT_TYPES and not _same(known.get(t.name), original_dir, t,
                                                        candidate_dir):
                names.add(t.name)
    return names


def _same(a: onnx.TensorProto | None, a_dir: str, b: onnx.TensorProto, b_dir: str) -> bool:
    if a is None or a.data_type != b.data_type or list(a.dims) != list(b.dims):
        return False
    if not is_external(a) and not is_external(b):
        return a.SerializeToString() == b.SerializeToString()
    return np.array_equal(tensor_value(a, a_dir), tensor_value(b, b_dir), equal_nan=True)


def with_perturbed(model: onnx.ModelProto, names: set[str] | None, base_dir: str,
                   seed: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` with the float initializers ``names`` (None: all) moved by one ulp;
    its other tensors stay where they are (external ones too)."""
    rng = np.random.default_rng(seed)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for g in graphs(copy.graph):
        for i, t in enumerate(g.initializer):
            if t.data_type in FLOAT_TYPES and (names is None or t.name in names):
                value = perturbed(tensor_value(t, base_dir), rng)
                g.initializer[i].CopyFrom(numpy_helper.from_array(value, t.name))
    return copy
