"""Batch norm as the per-channel affine map it is at inference: y = s*x + t on axis 1.

    s = gamma / sqrt(var + eps),   t = beta - mean * s        (float64)

`bn_affine` reads a BatchNormalization node and either returns its `Affine` or says why it is not a
fixed affine map (training mode, non-constant parameters, var + eps <= 0, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from bnfold.graph import FLOAT_TYPES, GraphView
from bnfold.nodes import attr, display_name

DEFAULT_EPSILON = np.float32(1e-5)  # BatchNormalization's epsilon is a float32 attribute

@dataclass
class Affine:
    """A per-channel map y = scale * x + shift on axis 1, and the nodes that compute it."""

    name: str
    x: str
    y: str
    scale: np.ndarray  # float64, shape [C] (or [1]: the same for every channel)
    shift: np.ndarray
    nodes: list[onnx.NodeProto]
    params: list[str] = field(default_factory=list)
    op: str = "BatchNormalization"
    axis: int = 1  # the axis the map acts on: 1 for BN; chains may act on the last axis (-1)

    def per_channel(self, channels: int) -> tuple[np.ndarray, np.ndarray] | str:
        if self.scale.size not in (1, channels) or self.shift.size not in (1, channels):
            return f"{self.name} has {self.scale.size} channels, the layer has {channels}"
        return _channels(self.scale, channels), _channels(self.shift, channels)


def _channels(values: np.ndarray, channels: int) -> np.ndarray:
    """A float64 copy of `values` as [channels] (broadcast from [1])."""
    if values.shape == (channels,):  # the usual case, without broadcast_to's cost
        return values.astype(np.float64)
    return np.broadcast_to(values, (channels,)).astype(np.float64)


def training_reason(node: onnx.NodeProto, opset: int) -> str | None:
    """Why `node` does not run in inference mode, or None when it does."""
    extra_outputs = [o for o in node.output[1:] if o]
    if opset < 9 and attr(node, "spatial", 1) == 0:
        return "per-activation BN (spatial=0): its statistics are not per channel"
    if opset >= 14:
        if attr(node, "training_mode", 0):
            return "BN in training mode (training_mode=1)"
        if extra_outputs:
            return "BN in training mode (running statistics outputs are declared)"
        return None
    if extra_outputs:  # before opset 14, declaring the statistics outputs means training
        return "BN in training mode (mean/var outputs are declared)"
    return None


def set_inference_mode(node: onnx.NodeProto) -> None:
    """Turn a training-mode BN into the inference-mode BN that uses its running statistics."""
    for i, a in enumerate(node.attribute):
        if a.name == "training_mode":
            del node.attribute[i]
            break
    del node.output[1:]


def bn_affine(view: GraphView, node: onnx.NodeProto) -> Affine | str:
    reason = training_reason(node, view.opset)
    if reason:
        return reason
    if len(node.input) < 5:
        return "BN has fewer than 5 inputs"
    values = []
    for role, name in zip(("scale", "bias", "mean", "var"), node.input[1:5]):
        value = view.constant(name)
        if isinstance(value, str):
            return f"BN parameter '{role}' is not constant: {value}"
        values.append(np.asarray(value))
    stored_var = values[3].reshape(-1)
    gamma, beta, mean, var = (v.astype(np.float64).reshape(-1) for v in values)
    if len({v.size for v in values}) != 1:
        return "BN parameters have different lengths"
    # epsilon is a float32 attribute (its default too), and onnxruntime adds it to var in
    # float32 (float64 for double models): var = -1e-5f gives 0 there, not 1e-5 - 1e-5f.
    eps = np.float32(attr(node, "epsilon", DEFAULT_EPSILON))
    runtime = np.float64 if stored_var.dtype == np.float64 else np.float32
    with np.errstate(all="ignore"):
        positive = stored_var.astype(runtime) + runtime(eps) > 0
    if not positive.all():
        channel = int(np.flatnonzero(~positive)[0])
        return f"var + eps <= 0 on channel {channel}"
    denom = var + np.float64(eps)
    scale = gamma / np.sqrt(denom)
    shift = beta - mean * scale
    if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
        return "folded scale or shift is not finite"
    return Affine(display_name(node), node.input[0], node.output[0], scale, shift, [node],
                  params=list(node.input[1:5]))


def range_reason(data_type: int | None, scale: np.ndarray, layer: str) -> str | None:
    """Why a backward fold whose shift is added by a separate node is unsafe in `data_type`:
    the layer's output, an fp16 tensor, becomes s*(Wx) before t is added, up to max|s| times
    what the original held (the BN itself computes in float32), so it can overflow where the
    original does not. Conv and Gemm add their own bias in float32: no such tensor there."""
    if data_type != onnx.TensorProto.FLOAT16:
        return None
    growth = float(np.max(np.abs(scale))) if scale.size else 0.0
    if growth <= 1.0:
        return None
    return (f"float16: {layer}'s output would be scaled by up to {growth:.4g} before the shift "
            f"is added, which can overflow where the original does not")


def cast_to(values: np.ndarray, data_type: int) -> np.ndarray | str:
    """`values` (float64) in the ONNX element type `data_type`, or why that is not exact enough."""
    np_type = FLOAT_TYPES.get(data_type)
    if np_type is None:
        return f"weight type {helper.tensor_dtype_to_string(data_type)} is not a float type"
    # max and min propagate NaN and need no temporary as large as the weight
    high, low = (float(values.max()), float(values.min())) if values.size else (0.0, 0.0)
    if not (math.isfinite(high) and math.isfinite(low)):
        return "folded weights are not finite"
    limit = _LIMITS[np_type]
    if max(high, -low) > limit:
        name = helper.tensor_dtype_to_string(data_type)[len("TensorProto."):].lower()
        return f"folded weights: a value overflows {name} (max {max(high, -low):.4g} > {limit:g})"
    if np_type is ml_dtypes.bfloat16:
        return _round_to_bfloat16(values)
    return values.astype(np_type)


_LIMITS = {np_type: float(ml_dtypes.finfo(np_type).max) for np_type in FLOAT_TYPES.values()}

_BLOCK = 1 << 18  # float64 elements (2 MiB) scaled at a time


def scaled(w: np.ndarray, factor: np.ndarray, data_type: int) -> np.ndarray | str:
    """`cast_to(float64(w) * factor, data_type)`, a block of rows at a time: the float64 product
    of a large weight is never held whole (allocating it costs more than the arithmetic).
    `factor` has the rank of `w` and broadcasts to it."""
    if FLOAT_TYPES.get(data_type) is None or w.ndim == 0 or w.size <= _BLOCK:
        return cast_to(w.astype(np.float64) * factor, data_type)  # (one block: the same)
    rows = max(1, _BLOCK // (w.size // len(w)))
    block = np.empty((min(rows, len(w)),) + w.shape[1:], np.float64)
    out = None
    for start in range(0, len(w), rows):
        part = block[:len(w) - start] if start + rows > len(w) else block
        part[...] = w[start:start + len(part)]
        part *= factor[start:start + len(part)] if factor.shape[0] > 1 else factor
        cast = cast_to(part, data_type)
        if isinstance(cast, str):  # the reason as the whole weight gives it
            return cast_to(w.astype(np.float64) * factor, data_type)
        if out is None:
            out = np.empty(w.shape, cast.dtype)
        out[start:start + len(part)] = cast
    return out


def _round_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Correctly rounded float64 -> bfloat16 (ml_dtypes rounds twice, via float32)."""
    first = np.asarray(values.astype(ml_dtypes.bfloat16))
    bits = first.view(np.uint16)
    candidates = np.stack([first, (bits + np.uint16(1)).view(ml_dtypes.bfloat16),
                           (bits - np.uint16(1)).view(ml_dtypes.bfloat16)])
    with np.errstate(invalid="ignore"):
        distance = np.abs(candidates.astype(np.float64) - values)
    distance = np.where(np.isnan(distance), np.inf, distance)
    odd = (candidates.view(np.uint16) & 1).astype(np.float64)
    # nearest first, then even mantissa on a tie
    order = np.lexsort((odd.reshape(3, -1), distance.reshape(3, -1)), axis=0)[0]
    return np.take_along_axis(candidates.reshape(3, -1), order[None], axis=0).reshape(values.shape)
