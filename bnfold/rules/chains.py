"""Batch norm as exporters decompose it: chains of Sub/Mul/Add/Div by constants, and Casts.

    x -> Sub(m) -> Mul(a) -> Add(b)   is the affine map   y = a*x + (b - a*m)

Each step composes into (s, t): `+c`: t+c; `-c`: t-c; `c-x`: (-s, c-t); `*c`: (c*s, c*t);
`/c`: (s/c, t/c). The constants must vary along one axis at most: that axis is the channel axis
the map can be folded on. Float-to-same-float Casts (Keras puts them everywhere) are no-ops.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from bnfold.affine import Affine
from bnfold.graph import FLOAT_TYPES, GraphView, remove_where, rename_all
from bnfold.nodes import attr, display_name, subgraphs
from bnfold.rules.layer import LINEAR_OPS

AFFINE_OPS = ("Add", "Sub", "Mul", "Div")


def affine_step(view: GraphView, node: onnx.NodeProto) -> tuple[int, np.ndarray] | None:
    """(index of the constant input, its value) when `node` is affine in its other input."""
    if node.op_type not in AFFINE_OPS or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    values = [view.constant(name) for name in node.input]
    constant = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if len(constant) != 1 or (node.op_type == "Div" and constant[0] == 0):
        return None
    index = constant[0]
    if view.elem_type(node.input[1 - index]) not in FLOAT_TYPES:
        return None
    return index, np.asarray(values[index])


def chain_heads(view: GraphView) -> list[onnx.NodeProto]:
    """First nodes of maximal affine chains. A linear layer's bias Add (right after it, or after
    its layout Transpose) belongs to the layer: the chain starts after it."""
    heads = []
    for node in view.graph.node:
        step = affine_step(view, node)
        if step is None or _is_layer_bias(view, node, step):
            continue
        before = view.producer.get(node.input[1 - step[0]])
        before_step = affine_step(view, before) if before is not None else None
        if before_step is not None and view.sole_user(before.output[0]) is node \
                and not _is_layer_bias(view, before, before_step):
            continue
        heads.append(node)
    return heads


@np.errstate(all="ignore")  # inf and NaN constants are refused below, not warned about
def chain_affine(view: GraphView, head: onnx.NodeProto) -> Affine | str:
    """The affine map of the chain starting at `head`, or why it is not one we can fold."""
    scale, shift = np.ones(()), np.zeros(())
    nodes, params, shapes, node, step = [], [], [], head, affine_step(view, head)
    x = head.input[1 - step[0]]
    while True:
        index, c = step
        if node.op_type == "Div" and np.any(c == 0):
            return f"{display_name(node)} divides by a constant containing zero"
        c = c.astype(np.float64)
        shapes.append(c.shape)
        if node.op_type == "Add":
            shift = shift + c
        elif node.op_type == "Sub":
            scale, shift = (scale, shift - c) if index == 1 else (-scale, c - shift)
        elif node.op_type == "Mul":
            scale, shift = scale * c, shift * c
        else:
            scale, shift = scale / c, shift / c
        nodes.append(node)
        params.append(node.input[index])
        after = view.sole_user(node.output[0])
        step = affine_step(view, after) if after is not None else None
        if step is None or after.input[1 - step[0]] != node.output[0]:
            break
        node = after
    y = nodes[-1].output[0]
    for shape in shapes:
        reason = _broadcast_reason(view, x, shape)
        if reason:
            return f"{display_name(head)}: {reason}"
    rank = view.rank(x)
    if rank is None and max(scale.ndim, shift.ndim) > 1:
        return f"rank of {x} is unknown, so the axis of the constants is unknown"
    if rank is not None and max(scale.ndim, shift.ndim) > rank:
        return f"constants of {display_name(head)} have more dimensions than its input"
    shape = np.broadcast_shapes(scale.shape, shift.shape)
    varying = [k for k, d in enumerate(shape) if d != 1]
    if len(varying) > 1:
        return f"constants of {display_name(head)} vary along more than one axis"
    axis = None if not varying else varying[0] - len(shape)
    scale = np.broadcast_to(scale, shape).reshape(-1)
    shift = np.broadcast_to(shift, shape).reshape(-1)
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return "folded scale or shift is not finite"
    return Affine(display_name(head), x, y, scale, shift, nodes, params=params, op="affine",
                  axis=axis)


def _broadcast_reason(view: GraphView, x: str, shape: tuple[int, ...]) -> str | None:
    """Why a constant of `shape` may change the shape of `x` by broadcasting (one channel
    becoming C): then the chain is no per-channel map of x. None when it cannot."""
    if all(d == 1 for d in shape):
        return None
    x_shape = view.shape(x)
    if x_shape is None:
        return f"the shape of {x} is unknown: a constant of shape {list(shape)} may broadcast it"
    if len(shape) > len(x_shape):
        return None  # "more dimensions than its input", below
    for d, x_d in zip(shape[::-1], x_shape[::-1]):
        if d != 1 and x_d != d:
            size = x_d if isinstance(x_d, int) else f"'{x_d}'" if x_d else "unknown"
            return (f"a constant of shape {list(shape)} broadcasts {x} (size {size} on that "
                    f"axis, not {d}): not a per-channel map")
    return None


def _is_layer_bias(view: GraphView, node: onnx.NodeProto, step: tuple[int, np.ndarray]) -> bool:
    if node.op_type != "Add":
        return False
    before = view.producer.get(node.input[1 - step[0]])
    if before is not None and before.op_type == "Transpose":
        before = view.producer.get(before.input[0])
    return before is not None and before.op_type in LINEAR_OPS


def remove_noop_casts(model: onnx.ModelProto, type_of: Callable[[str], int | None]) -> int:
    """Remove every Cast to its input's own type (`type_of` a value's element type, read only
    for the inputs of Casts), unless it produces a graph output.

    Each graph's Casts are found in one walk (a chain of them resolves to the first input),
    removed in one sweep and their readers renamed in one more walk, subgraphs included.
    """
    removed = 0

    def visit(graph: onnx.GraphProto) -> None:
        nonlocal removed
        outputs = {o.name for o in graph.output}
        renames: dict[str, str] = {}  # a removed Cast's output -> the value it passed on
        casts = []
        for node in graph.node:
            if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
                source = renames.get(node.input[0], node.input[0])
                if type_of(source) == attr(node, "to") and node.output[0] not in outputs:
                    renames[node.output[0]] = source
                    casts.append(node)
        if casts:
            doomed = set(map(id, casts))  # (`casts` keeps the wrappers, and their ids, alive)
            remove_where(graph.node, lambda n: id(n) in doomed)
            rename_all(graph, renames)
            remove_where(graph.value_info, lambda v: v.name in renames)
            removed += len(renames)
        for node in graph.node:
            for _, sub in subgraphs(node):
                visit(sub)

    visit(model.graph)
    return removed
