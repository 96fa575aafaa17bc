"""Fold backward: a linear layer followed by the affine map y = s*x + t.

    W'[output channel c] = s_c * W[output channel c]        b'_c = s_c * b_c + t_c

The layer is Conv, ConvTranspose, Gemm or MatMul, optionally with a bias Add after it; the affine
map must act on the axis that holds the layer's output channels.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.affine import Affine, cast_to, range_reason, scaled
from bnfold.graph import GraphView
from bnfold.nodes import attr, display_name
from bnfold.rules.layer import LINEAR_OPS, Layer, bias_add_after, gemm_attrs, make_layer, optional_constant
from bnfold.rules.plan import Plan


# Each returns the factor of every weight element (an array of the weight's rank that
# broadcasts to it, small: no kernel axes), from the per-output-channel scale `s`.
def _scale_conv(node: onnx.NodeProto, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    return s.reshape((-1,) + (1,) * (w.ndim - 1))  # [M, C/group, k...]: axis 0, any group


def _scale_conv_transpose(node: onnx.NodeProto, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    # [C_in, M/group, k...]: input group g's rows feed output channels g*(M/group) + j, so the
    # scale of column j depends on the row's group.
    group = int(attr(node, "group", 1))
    c_in, per_group = w.shape[0], w.shape[1]
    rows = np.repeat(s.reshape(group, per_group), c_in // group, axis=0)  # [C_in, M/group]
    return rows.reshape((c_in, per_group) + (1,) * (w.ndim - 2))


def _scale_gemm(node: onnx.NodeProto, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    return s[:, None] if gemm_attrs(node)[3] else s[None, :]  # the columns of B'


def _scale_matmul(node: onnx.NodeProto, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    return s[None, :]


# op -> (output channels of the weight, how to scale them, index of the op's own bias input)
OUTPUT_CHANNELS = {
    "Conv": (lambda node, w: w.shape[0], _scale_conv, 2),
    "ConvTranspose": (lambda node, w: w.shape[1] * int(attr(node, "group", 1)), _scale_conv_transpose, 2),
    "Gemm": (lambda node, w: w.shape[0] if gemm_attrs(node)[3] else w.shape[1], _scale_gemm, 2),
    "MatMul": (lambda node, w: w.shape[1], _scale_matmul, None),
}


def producer_layer(view: GraphView, aff: Affine) -> Layer | str:
    """The linear layer only the affine map reads: Linear [-> bias Add] [-> layout Transpose],
    or Linear -> Transpose -> bias Add (Keras's convolutions)."""
    name, node, identities = aff.x, view.producer.get(aff.x), []
    while node is not None and node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
        reason = view.why_not_private(name, display_name(node))
        if reason:
            return reason
        identities.append(node)  # removed by the fold: the layer produces y itself
        name = node.input[0]
        node = view.producer.get(name)
    if node is None:
        return "its input is not computed in this graph by a linear layer"
    reason = view.why_not_private(name, display_name(node))
    if reason:
        return reason
    bias = transpose = reshape = None
    if node.op_type in ("Reshape", "Flatten") and node.domain in ("", "ai.onnx"):
        found = _token_reshape(view, node, name)
        if isinstance(found, str):
            return found
        reshape, node = node, found
    if node.op_type == "Add":
        bias, node = _bias_add_before(view, node)
        if bias is None:
            return "producer Add is not a linear layer's bias"
    if reshape is not None:
        if node.op_type != "MatMul":
            return f"producer {node.op_type} of {display_name(reshape)} is not a MatMul"
    elif node.op_type == "Transpose" and view.producer.get(node.input[0]) is not None:
        reason = view.why_not_private(node.input[0], display_name(node))
        if reason:
            return reason
        transpose, node = node, view.producer[node.input[0]]
        if bias is None and node.op_type == "Add":
            bias, node = _bias_add_before(view, node)
            if bias is None:
                return "producer Add is not a linear layer's bias"
    if node.op_type not in LINEAR_OPS:
        return f"producer {node.op_type} is not a linear layer"
    layer = make_layer(view, node, bias)
    if isinstance(layer, Layer):
        layer.transpose, layer.identities, layer.reshape = transpose, identities, reshape
    return layer


def _token_reshape(view: GraphView, node: onnx.NodeProto, name: str) -> onnx.NodeProto | str:
    """The node before a Reshape/Flatten `node` (producing `name`) that only merges leading
    axes, [..., C] -> [M, C] (LeViT's BatchNorm1d over flattened tokens): its C stays the
    feature axis, so a BN on axis 1 of `name` is per feature of the MatMul before it."""
    before, after = view.shape(node.input[0]), view.shape(name)
    what = f"{node.op_type} {display_name(node)}"
    if before is None or after is None:
        return f"shapes around {what} are unknown"
    if node.op_type == "Flatten" and int(attr(node, "axis", 1)) % max(len(before), 1) != len(before) - 1:
        return f"{what} does not keep the last axis"
    if not (len(after) == 2 and len(before) >= 2 and isinstance(before[-1], int)
            and after[1] == before[-1]):
        return f"{what} does not merge leading axes into [rows, {before[-1]}]"
    source = node.input[0]
    producer = view.producer.get(source)
    if producer is None:
        return f"the input of {what} is not computed in this graph by a linear layer"
    # Shape and Size read only the shape, which the fold keeps
    others = [u for u in view.users(source) if u is not node and u.op_type not in ("Shape", "Size")]
    if source in view.outputs or others:
        return view.why_not_private(source, display_name(producer)) or \
            f"output of {display_name(producer)} has other consumers"
    return producer


def _bias_add_before(view: GraphView, add: onnx.NodeProto):
    """(the bias found by `bias_add_after`, the node it follows) when `add` is a bias Add."""
    for name in add.input:
        before = view.producer.get(name)
        found = bias_add_after(view, before) if before is not None else None
        if found is not None and found[0] is add:
            return found, before
    return None, add


def output_axis_reason(view: GraphView, layer: Layer, aff: Affine) -> str | None:
    """Why the affine's axis is not the axis holding the layer's output channels."""
    op = layer.node.op_type
    if op == "MatMul":
        rank = view.rank(aff.x) or view.rank(layer.output)  # the layer's tensors share one rank
        if rank is None:
            return f"rank of {layer.name}'s output is unknown, so its feature axis is unknown"
        channel_axis = rank - 1
    else:
        rank = 2 if op == "Gemm" else layer.weight.ndim
        channel_axis = 1
    if aff.axis is None:
        return None
    axis = aff.axis % rank
    if layer.transpose is not None:
        axis = layer.perm(rank)[axis]
    if axis != channel_axis:
        return (f"{op} output has rank {rank}: axis {axis} normalised by "
                f"{aff.name} is not the feature axis {channel_axis}")
    return None


def plan_backward(view: GraphView, aff: Affine) -> Plan | str:
    layer = producer_layer(view, aff)
    if isinstance(layer, str):
        return layer
    reason = output_axis_reason(view, layer, aff)
    if reason:
        return reason
    node = layer.node
    channels_of, scale_weight, bias_index = OUTPUT_CHANNELS[node.op_type]
    per_channel = aff.per_channel(channels_of(node, layer.weight))
    if isinstance(per_channel, str):
        return per_channel
    s, t = per_channel
    plan = Plan(into=node, direction="backward", remove=list(aff.nodes) + layer.identities)

    ndim = layer.weight.ndim
    weight, layer.weight = layer.weight, None  # a weight can be a large part of memory
    weight = scaled(weight, scale_weight(node, weight, s), layer.weight_type)
    if isinstance(weight, str):
        return weight
    plan.set_tensor(node, 1, weight, "weight")

    # The shift goes into the bias Add when there is one, else into the op's own bias.
    # Gemm's tensors have rank 2, Conv's and ConvTranspose's that of the weight; MatMul's, its
    # inputs' (read only there: a fold into a Conv or a Gemm needs no shape inference).
    rank = {"Gemm": 2, "MatMul": None}.get(node.op_type, ndim)
    if rank is None:
        rank = view.rank(aff.x) or view.rank(layer.output) or 2
    channel_axis = rank - 1 if node.op_type == "MatMul" else 1
    if layer.bias_after_transpose:
        channel_axis = layer.perm(rank).index(channel_axis)
    along = (-1,) + (1,) * (rank - 1 - channel_axis)  # a [C] vector on the bias's channel axis
    if bias_index is not None and layer.bias_add is not None:
        # A per-channel bias Add merges into the op's own bias: one node less.
        vector = _channel_vector(layer.add_bias, rank, channel_axis, len(s))
        if vector is not None:
            plan.remove.append(layer.bias_add)
            layer.bias_add, t = None, vector * s + t
    shift_taken = layer.bias_add is not None
    if shift_taken or (bias_index is None and np.any(t)):  # the shift in an Add after the op
        reason = range_reason(view.elem_type(layer.output), s, layer.name)
        if reason:
            return reason
    if shift_taken:
        bias = layer.add_bias.astype(np.float64) * s.reshape(along) + t.reshape(along)
        bias = cast_to(bias, view.constant_dtype(layer.bias_add.input[layer.add_index]))
        if isinstance(bias, str):
            return bias
        plan.set_tensor(layer.bias_add, layer.add_index, bias, "bias")
    if bias_index is not None:
        own = optional_constant(view, node, bias_index)
        if isinstance(own, str):
            return own
        beta = gemm_attrs(node)[1] if node.op_type == "Gemm" else 1.0
        if own is not None:
            own = None if beta == 0.0 else beta * own.astype(np.float64)  # beta = 0: C unread
        if own is not None or not shift_taken:
            # Conv's bias is [M], Gemm's C broadcasts to [M, N]: channels are its last axis.
            bias = (0.0 if own is None else own * s) + (0.0 if shift_taken else t)
            bias = cast_to(np.asarray(bias), layer.bias_type(bias_index))
            if isinstance(bias, str):
                return bias
            plan.set_tensor(node, bias_index, bias, "bias")
            if beta != 1.0:
                plan.attributes.append((node, "beta", 1.0))
            shift_taken = True
    if shift_taken or not np.any(t):
        plan.outputs.append((layer.last, 0, aff.y))
    elif layer.transpose is not None:
        return f"{layer.name} has no bias to take the shift before its Transpose"
    else:  # a MatMul without bias: add one (before the token Reshape, if any)
        bias = cast_to(t, layer.weight_type)
        if isinstance(bias, str):
            return bias
        if layer.reshape is None:
            plan.add_bias = (node, bias, aff.y)
        else:
            biased = view.names(f"{node.output[0]}/biased")
            plan.add_bias = (node, bias, biased)
            plan.rewire.append((layer.reshape, 0, biased))
            plan.outputs.append((layer.reshape, 0, aff.y))
    return plan


def _channel_vector(bias: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
    """`bias` as a [channels] float64 vector, when it varies along `axis` of a rank-`rank`
    tensor only (or not at all) and broadcasting it changes no shape; else None."""
    if bias.ndim > rank:
        return None
    shape = (1,) * (rank - bias.ndim) + bias.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(bias.astype(np.float64).reshape(-1), (channels,))
