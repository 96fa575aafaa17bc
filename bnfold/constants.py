"""Constants that exporters compute with small node chains instead of storing them.

torch's dynamo exporter (optimize=False) writes the zero bias of a Conv(bias=False) as
`Expand(CastLike(0, x), Expand(Shape(W), [1]))` and the scale of BatchNorm(affine=False) as
`Expand(CastLike(1, y), Shape(y, start=1, end=2))`: constant, though `x` and `y` are not, because
CastLike reads only the element type of its second input and Shape only a static shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bnfold.nodes import attr

if TYPE_CHECKING:  # graph.py reads computed constants through this module, not the reverse
    from bnfold.graph import GraphView

# Folding reads small parameter tensors: refuse to read or materialise anything larger.
MAX_ELEMENTS = 1 << 24

_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal", "Pow", "Where",
                          "Equal", "Max", "Min", "Identity", "Cast", "CastLike"})
_OPS = _ELEMENTWISE | {"Shape", "Size", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Concat",
                       "Gather", "Slice", "Transpose", "Range", "ConstantOfShape"}


@dataclass
class _Chain:
    nodes: list[onnx.NodeProto] = field(default_factory=list)  # evaluation order
    known: dict[str, np.ndarray] = field(default_factory=dict)  # leaves: constants, static shapes


def computed_constant(view: GraphView, name: str, *, limit: int = 64) -> np.ndarray | None:
    """The value of `name` if constants alone determine it, through at most `limit` nodes.

    Reads stored constants (`view.constant`), static shapes for Shape and Size, element types for
    CastLike's second input, and evaluates the rest with the ONNX reference evaluator at the
    model's opset. None when something is not constant, too large, or fails to evaluate.
    """
    chain = _trace(view, name, limit)
    if chain is None:
        return None
    values = dict(chain.known)
    for node in chain.nodes:
        if node.output[0] in values:  # a leaf: Constant, or Shape/Size of a static shape
            continue
        args = [values.get(i) for i in node.input]  # None: absent, or CastLike's type source
        try:
            if _output_size(node, args) > MAX_ELEMENTS:
                return None
            values.update(zip(node.output, _run(view, node, args)))
        except Exception:  # a chain the evaluator rejects (bad shapes, types) is no constant
            return None
    return values[name]


def computed_nodes(view: GraphView, name: str, *, limit: int = 64) -> list[onnx.NodeProto]:
    """The nodes `computed_constant` reads to compute `name` (Constant nodes included), in
    evaluation order; empty when `name` is not such a constant. Some may have other consumers."""
    chain = _trace(view, name, limit)
    return [] if chain is None else chain.nodes


def _trace(view: GraphView, name: str, limit: int) -> _Chain | None:
    chain, visited = _Chain(), set()

    def visit(value: str) -> bool:
        if value in chain.known or value in visited:
            return True
        node = view.producer.get(value)
        if node is None or node.op_type == "Constant":
            leaf = _stored_constant(view, value)
            if leaf is None:
                return False
            chain.known[value] = leaf
            chain.nodes.extend([node] if node is not None else [])
            return True
        if node.op_type not in _OPS or node.domain not in ("", "ai.onnx") or len(visited) >= limit:
            return False
        visited.add(value)
        inputs = [i for i in node.input if i]
        if node.op_type in ("Shape", "Size"):
            static = _static_shape(node, view.shape(node.input[0]))
            if static is not None:
                chain.known[value] = static
                inputs = []
        elif node.op_type == "CastLike":
            if view.elem_type(node.input[1]) is None:
                return False
            inputs = inputs[:1]
        if not all(visit(i) for i in inputs):
            return False
        chain.nodes.append(node)
        return True

    return chain if visit(name) else None


def _stored_constant(view: GraphView, name: str) -> np.ndarray | None:
    shape = view.shape(name)  # an initializer's shape is known: check it before reading the data
    if shape is not None and math.prod(d for d in shape if isinstance(d, int)) > MAX_ELEMENTS:
        return None
    value = view.constant(name)
    return None if isinstance(value, str) or value.size > MAX_ELEMENTS else value


def _static_shape(node: onnx.NodeProto, shape: tuple | None) -> np.ndarray | None:
    """Shape or Size of a tensor of inferred `shape`, if the dims it reads are static."""
    if shape is not None and node.op_type == "Shape":
        shape = shape[attr(node, "start", 0):attr(node, "end")]  # ONNX clamps like Python slices
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    if node.op_type == "Size":
        return np.array(math.prod(shape), dtype=np.int64)
    return np.array(shape, dtype=np.int64)


def _output_size(node: onnx.NodeProto, args: list[np.ndarray | None]) -> int:
    """The number of elements `node` would produce (an upper bound), computed before running it."""
    op, present = node.op_type, [a for a in args if a is not None]
    if op == "ConstantOfShape":
        return math.prod(int(d) for d in args[0])
    if op == "Range":
        start, stop, delta = (float(a) for a in args)
        return max(math.ceil((stop - start) / delta), 0)
    if op == "Expand":
        return math.prod(np.broadcast_shapes(args[0].shape, tuple(int(d) for d in args[1])))
    if op in _ELEMENTWISE:
        return math.prod(np.broadcast_shapes(*(a.shape for a in present)))
    if op == "Gather":
        data, indices = args
        return data.size // max(data.shape[attr(node, "axis", 0)], 1) * indices.size
    return sum(a.size for a in present)  # the rest rearrange or select: they never grow data


def _run(view: GraphView, node: onnx.NodeProto, args: list[np.ndarray | None]) -> list[np.ndarray]:
    """`node` alone, on `args`, in the reference evaluator at the model's opset (domain "")."""
    op, inputs = node.op_type, node.input
    if op == "CastLike":  # the second input lends its type only: it may not be constant
        op, inputs = "Cast", node.input[:1]
    bare = helper.make_node(op, inputs, node.output)
    bare.attribute.extend(node.attribute)  # CastLike's saturate means the same for Cast
    if op != node.op_type:
        bare.attribute.append(helper.make_attribute("to", view.elem_type(node.input[1])))
    feeds = [numpy_helper.from_array(a, i) for i, a in zip(inputs, args) if a is not None]
    outputs = [onnx.ValueInfoProto(name=o) for o in node.output]
    graph = helper.make_graph([bare], "computed", [], outputs, initializer=feeds)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", view.opset)])
    return ReferenceEvaluator(model).run(None, {})
