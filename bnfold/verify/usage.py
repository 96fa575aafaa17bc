"""What the graph does with an input, so that random values of it are valid.

An integer input may be an index (Gather: below the dimension it indexes), a shape (Reshape: one
that fits the data), a count (Range, ConstantOfShape, Loop's trip count), a divisor... Random
values in 0..4 make most such models fail to run, and a check that cannot run checks nothing.
An input is followed through Cast/Identity/Unsqueeze/Squeeze/Flatten to the node that uses it;
an input without a known use gets values in 0..4.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.graph import FLOAT_TYPES, infer_shapes
from bnfold.nodes import attr, graphs

# Nodes an input goes through unchanged in value (a use of their output is a use of it).
_PASS_THROUGH = {"Cast", "CastLike", "Identity", "Unsqueeze", "Squeeze", "Flatten"}


@dataclass
class Use:
    """How to fill one input: a kind (below) and, for indices, the dimensions they index.

    "index": in 0 .. d-1 for the smallest d of ``dims`` (0 when none is known); "shape of": the
    shape of ``data`` (or [1, ..., 1, -1] when it is unknown or of another rank); "ones",
    "zeros", "arange" (0, 1, 2, ...: distinct axes), "max" (the type's largest value: an end
    past every dimension), "positive" (1..4), "depth" (2..5), "trip count" (5..12: past the
    first iterations), "pads" (0..2), "false", "half" (0.5: a threshold), "branch" (an If's
    condition: true in even draws, false in odd ones), "split" (sizes adding up to the split
    dimension), "squeeze" (axes of size 1).
    """

    kind: str
    dims: list[int | str | None] = field(default_factory=list)
    data: str | None = None
    data_shape: tuple | None = None

    @property
    def after(self) -> bool:
        """Depends on another input's drawn shape: draw it last."""
        return self.kind == "shape of"

    def values(self, shape: list[int], dtype: np.dtype, rng: np.random.Generator,
               sizes: Mapping[str, int], drawn: Mapping[str, list[int]],
               draw: int = 0) -> np.ndarray:
        kind = self.kind
        if kind == "branch":  # an If's condition: then, else, then... one branch per draw
            return np.full(shape, draw % 2 == 0).astype(dtype)
        if kind == "index":
            known = [d if isinstance(d, int) else sizes.get(d) for d in self.dims if d is not None]
            known = [d for d in known if d is not None and d > 0]
            return rng.integers(0, min(known, default=1), shape).astype(dtype)
        if kind == "shape of":
            return _shape_like(self._data_shape(sizes, drawn), shape).astype(dtype)
        if kind in ("split", "squeeze"):
            data = [d if isinstance(d, int) else sizes.get(d) for d in self.dims]
            return _split_or_squeeze(kind, data, math.prod(shape)).reshape(shape).astype(dtype)
        if kind == "max":
            return np.full(shape, np.iinfo(dtype).max if dtype.kind in "iu" else 1e9, dtype)
        if kind == "arange":
            return np.arange(math.prod(shape)).reshape(shape).astype(dtype)
        ranges = {"positive": (1, 5), "depth": (2, 6), "trip count": (5, 13), "pads": (0, 3)}
        if kind in ranges:
            return rng.integers(*ranges[kind], shape).astype(dtype)
        fill = {"ones": 1, "zeros": 0, "false": 0, "half": 0.5}[kind]
        return np.full(shape, fill).astype(dtype)

    def _data_shape(self, sizes: Mapping[str, int], drawn: Mapping[str, list[int]]):
        if self.data in drawn:
            return drawn[self.data]
        if self.data_shape is None:
            return None
        dims = [d if isinstance(d, int) else sizes.get(d) if d else None for d in self.data_shape]
        return None if None in dims else dims


def _split_or_squeeze(kind: str, dims: list[int | None], count: int) -> np.ndarray:
    """Split sizes (``dims``: the split dimension) adding up to it, or the axes of size 1 to
    squeeze (``dims``: the data's shape); 0, 1, 2... when the sizes are unknown."""
    if kind == "split" and dims and dims[0] is not None and dims[0] >= count >= 1:
        return np.array([1] * (count - 1) + [dims[0] - count + 1])
    ones = [axis for axis, d in enumerate(dims) if d == 1]
    return np.array(ones[:count] if len(ones) >= count else range(count))


def _shape_like(data_shape: list[int] | None, shape: list[int]) -> np.ndarray:
    """A target shape with ``shape``'s length (usually [k]) that a tensor of ``data_shape`` fits."""
    length = shape[0] if len(shape) == 1 else math.prod(shape)
    if data_shape is not None and len(data_shape) == length:
        target = list(data_shape)
    else:
        target = [1] * (length - 1) + [-1] if length else []
    return np.array(target).reshape(shape)


def _index(axis_of=None, from_axis=None, data_input=0):
    """An index into input ``data_input`` along the axis attribute (or every axis from one on)."""
    def rule(node, shapes):
        data = shapes.get(node.input[data_input])
        if data is None:
            return Use("index")
        if from_axis is not None:
            start = attr(node, from_axis, 0) if isinstance(from_axis, str) else from_axis
            return Use("index", list(data[start:]))
        axis = attr(node, axis_of, 0) if axis_of else 0
        return Use("index", [data[axis]] if -len(data) <= axis < len(data) else [])
    return rule


def _kind(kind):
    return lambda node, shapes: Use(kind)


def _shape_of(data_input=0):
    def rule(node, shapes):
        name = node.input[data_input]
        return Use("shape of", data=name, data_shape=shapes.get(name))
    return rule


def _split(node, shapes):
    data = shapes.get(node.input[0])
    axis = attr(node, "axis", 0)
    return Use("split", [data[axis]] if data and -len(data) <= axis < len(data) else [None])


def _squeeze(node, shapes):
    return Use("squeeze", list(shapes.get(node.input[0]) or []))


def _integer_divisor(node, shapes):
    return Use("positive")  # for integers a zero divisor fails; for floats 1..4 is harmless


# (op, input position) -> rule(node, shapes) -> Use
_RULES = {
    ("Gather", 1): _index("axis"),
    ("GatherElements", 1): _index("axis"),
    ("GatherND", 1): _index(from_axis="batch_dims"),
    ("Scatter", 1): _index("axis"),
    ("ScatterElements", 1): _index("axis"),
    ("ScatterND", 1): _index(from_axis=0),
    ("NegativeLogLikelihoodLoss", 1): _index(from_axis=1),
    ("SoftmaxCrossEntropyLoss", 1): _index(from_axis=1),
    ("RoiAlign", 2): _kind("zeros"),
    ("Reshape", 1): _shape_of(),
    ("Resize", 3): _shape_of(),
    ("CenterCropPad", 1): _shape_of(),
    ("Resize", 2): _kind("ones"),
    ("Upsample", 1): _kind("ones"),
    ("Expand", 1): _kind("ones"),
    ("Tile", 1): _kind("ones"),
    ("Slice", 1): _kind("zeros"),
    ("Slice", 2): _kind("max"),
    ("Slice", 3): _kind("arange"),
    ("Slice", 4): _kind("ones"),
    ("TopK", 1): _kind("ones"),
    ("OneHot", 1): _kind("depth"),
    ("Range", 2): _kind("ones"),
    ("ConstantOfShape", 0): _kind("positive"),
    ("Mod", 1): _integer_divisor,
    ("Div", 1): _integer_divisor,
    ("Pad", 1): _kind("pads"),
    ("Pad", 3): _kind("arange"),
    ("Unsqueeze", 1): _kind("arange"),
    ("CumSum", 1): _kind("zeros"),
    ("CumProd", 1): _kind("zeros"),
    ("Split", 1): _split,
    ("SplitToSequence", 1): _split,
    ("Squeeze", 1): _squeeze,
    ("NonMaxSuppression", 3): _kind("half"),
    ("NonMaxSuppression", 4): _kind("zeros"),
    ("Loop", 0): _kind("trip count"),
    ("If", 0): _kind("branch"),
    ("SequenceAt", 1): _kind("zeros"),
    ("SequenceInsert", 2): _kind("zeros"),
    ("SequenceErase", 1): _kind("zeros"),
    ("ReverseSequence", 1): _kind("ones"),
    ("Dropout", 1): _kind("zeros"),
    ("Dropout", 2): _kind("false"),
    ("Col2Im", 2): _kind("ones"),
    **{(op, 1): _kind("arange") for op in (
        "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")},
}


def input_uses(model: onnx.ModelProto, inputs) -> dict[str, Use]:
    """The use that bounds each graph input's values, for the inputs that have one."""
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for graph in graphs(model.graph):
        for node in graph.node:
            for position, name in enumerate(node.input):
                if name:
                    readers.setdefault(name, []).append((node, position))
    shapes: dict | None = None
    uses: dict[str, Use] = {}
    for v in inputs:
        found: list[Use] = []
        seen, frontier = {v.name}, [v.name]
        while frontier:
            name = frontier.pop()
            for node, position in readers.get(name, []):
                if node.domain not in ("", "ai.onnx"):
                    continue
                if node.op_type in _PASS_THROUGH and position == 0:
                    frontier += [o for o in node.output[:1] if o not in seen]
                    seen.update(node.output[:1])
                    continue
                rule = _RULES.get((node.op_type, position))
                if rule is _integer_divisor and v.elem_type in FLOAT_TYPES:
                    continue  # a float divisor may be anything
                if rule is not None:
                    if shapes is None:
                        shapes = infer_shapes(model)[0]
                    found.append(rule(node, shapes))
        if found:
            uses[v.name] = _combine(found)
    return uses


def _combine(found: list[Use]) -> Use:
    """Indices used in several places: below every dimension they index; else the first use."""
    indices = [u for u in found if u.kind == "index"]
    if len(indices) == len(found):
        return Use("index", [d for u in indices for d in u.dims])
    return next(u for u in found if u.kind != "index")
