"""Fold forward: the affine map y = s*x + t followed by a linear layer (BN after an activation).

    W (s*x + t) + b = (W diag(s)) x + (W t + b)

Scale the layer's input-channel slice of the weight by s and add W t to its bias. Through a
Flatten/Reshape that keeps channel blocks contiguous, channel c becomes features c*R ... (c+1)*R-1;
through a layout Transpose, the channel axis moves with the permutation.
A Conv that reads zero padding breaks the shift part (padded zeros never received t).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from bnfold.affine import Affine, cast_to
from bnfold.graph import GraphView
from bnfold.nodes import attr, display_name
from bnfold.rules.layer import Layer, bias_add_after, gemm_attrs, make_layer, optional_constant
from bnfold.rules.plan import Plan

FORWARD_OPS = ("Conv", "Gemm", "MatMul")


def _flatten_repeat(view: GraphView, aff: Affine, node: onnx.NodeProto) -> int | str:
    """How many features each channel becomes through a Flatten/Reshape to [N, C*R]."""
    shape = view.shape(aff.y)
    if shape is None or len(shape) < 2 or not all(isinstance(d, int) for d in shape[1:]):
        return f"shape after {aff.name} is not static, so {node.op_type} cannot be followed"
    features = math.prod(shape[1:])
    if node.op_type == "Flatten" and int(attr(node, "axis", 1)) == 1:
        return features // shape[1]
    out = view.shape(node.output[0])
    if node.op_type == "Reshape" and out is not None and len(out) == 2 and out[1] == features:
        return features // shape[1]
    return f"{node.op_type} {display_name(node)} does not flatten to [batch, channels*spatial]"


def _consumer(view: GraphView, aff: Affine) -> tuple[Layer, onnx.NodeProto | None, int] | str:
    """The linear layer reading the affine's output, maybe through a layout Transpose or a
    Flatten/Reshape: (layer, the node in between or None, features per channel)."""
    reason = view.why_not_private(aff.y, aff.name)
    if reason:
        return reason
    reader = view.sole_user(aff.y)  # what the fold rewires to read x instead
    found = _through_identities(view, aff.y)
    if isinstance(found, str):
        return found
    data, user = found
    between, repeat, axis = None, 1, aff.axis
    if user.op_type in ("Transpose", "Flatten", "Reshape"):
        rank = view.rank(aff.y)
        if rank is None:
            return f"rank after {aff.name} is unknown, so {user.op_type} cannot be followed"
        if user.op_type == "Transpose":  # axis a of the input is axis perm.index(a) after it
            perm = list(attr(user, "perm", reversed(range(rank))))
            axis = None if axis is None else perm.index(axis % rank)
        else:
            if axis is not None and axis % rank != 1:
                return f"{aff.name} does not act on the channel axis 1 that {user.op_type} flattens"
            repeat = _flatten_repeat(view, aff, user)
            if isinstance(repeat, str):
                return repeat
        between = user
        reason = view.why_not_private(user.output[0], display_name(user))
        if reason:
            return reason
        found = _through_identities(view, user.output[0])
        if isinstance(found, str):
            return found
        data, user = found
    if user.op_type not in FORWARD_OPS:
        return f"consumer {user.op_type} is not a linear layer"
    if user.input[0] != data or data in user.input[1:]:
        return f"{aff.name} feeds {display_name(user)}'s weight, not its data input"
    layer = make_layer(view, user, bias_add_after(view, user) if user.op_type == "MatMul" else None)
    if isinstance(layer, str):
        return layer
    if user.op_type == "Gemm" and gemm_attrs(user)[2]:
        return f"Gemm {layer.name} has transA=1: axis 1 of its input is not the feature axis"
    rank = view.rank(data) or {"Gemm": 2, "Conv": layer.weight.ndim}.get(user.op_type)
    if rank is None:
        return f"rank of {layer.name}'s input is unknown, so its feature axis is unknown"
    # MatMul's features are its input's last axis; Gemm's (rank 2) and Conv's are axis 1.
    feature_axis = rank - 1 if user.op_type == "MatMul" else 1
    if axis is not None and axis % rank != feature_axis:
        return (f"{user.op_type} {layer.name} input has rank {rank}: axis {axis % rank} "
                f"normalised by {aff.name} is not the feature axis {feature_axis}")
    return layer, between, repeat, reader


def _through_identities(view: GraphView, name: str) -> tuple[str, onnx.NodeProto] | str:
    """(the value, its sole reader) after the Identity nodes that copy `name`, if any."""
    user = view.sole_user(name)
    while user.op_type == "Identity" and user.domain in ("", "ai.onnx"):
        name = user.output[0]
        reason = view.why_not_private(name, display_name(user))
        if reason:
            return reason
        user = view.sole_user(name)
    return name, user


def _pads_reason(node: onnx.NodeProto) -> str | None:
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if any(attr(node, "pads", [])) or auto_pad.startswith("SAME"):
        return f"Conv {display_name(node)} reads zero padding: the shift cannot fold forward"
    return None


def plan_forward(view: GraphView, aff: Affine) -> Plan | str:
    found = _consumer(view, aff)
    if isinstance(found, str):
        return found
    layer, between, repeat, reader = found
    # A float64 copy, scaled in place below; it replaces the stored one at once (memory).
    node, w, layer.weight = layer.node, layer.weight.astype(np.float64), None
    op = node.op_type
    if op == "Conv":
        group = int(attr(node, "group", 1))
        features, outputs = w.shape[1] * group, w.shape[0]
    elif op == "Gemm":
        alpha, beta, _, trans_b = gemm_attrs(node)
        features = w.shape[1] if trans_b else w.shape[0]
    else:
        features = w.shape[0]
    if features % repeat:
        return f"{layer.name} has {features} input features, not a multiple of {repeat}"
    per_channel = aff.per_channel(features // repeat)
    if isinstance(per_channel, str):
        return per_channel
    s, t = (np.repeat(v, repeat) for v in per_channel)
    plan = Plan(into=node, direction="forward", remove=list(aff.nodes))

    if op == "Conv":
        if np.any(t) and _pads_reason(node):
            return _pads_reason(node)
        # input channel of weight[m, c] is g*(C/group) + c, g = the group of output m
        per_group = features // group
        s_in = s.reshape(group, per_group)[np.arange(outputs) // (outputs // group)]
        t_in = t.reshape(group, per_group)[np.arange(outputs) // (outputs // group)]
        delta = (w.reshape(outputs, per_group, -1).sum(axis=-1) * t_in).sum(axis=-1)
        w *= s_in.reshape(s_in.shape + (1,) * (w.ndim - 2))
        bias_index = 2
    elif op == "Gemm":
        delta = alpha * (t @ (w.T if trans_b else w))
        w *= s[None, :] if trans_b else s[:, None]
        bias_index = 2
    else:
        delta, bias_index = t @ w, None
        w *= s[:, None]

    weight = cast_to(w, layer.weight_type)
    if isinstance(weight, str):
        return weight
    plan.set_tensor(node, 1, weight, "weight")
    if bias_index is not None:
        own = optional_constant(view, node, bias_index)
        if isinstance(own, str):
            return own
        if op == "Gemm":
            own = None if own is None or beta == 0.0 else beta * own.astype(np.float64)
            if beta != 1.0:
                plan.attributes.append((node, "beta", 1.0))
        bias = cast_to(np.asarray(delta if own is None else own + delta), layer.bias_type(bias_index))
        if isinstance(bias, str):
            return bias
        plan.set_tensor(node, bias_index, bias, "bias")
    elif np.any(t) and view.elem_type(node.output[0]) == onnx.TensorProto.FLOAT16:
        # MatMul's own output, W'x = W(s*x + t) - W t, is an fp16 tensor before its bias Add:
        # far larger than W(s*x + t) when the shift is large (inputs in 0..255, mean 128)
        return (f"float16: {layer.name}'s output would hold W(s*x) before the shift W*t is "
                f"added, which can overflow where the original does not")
    elif layer.bias_add is not None:
        bias = cast_to(layer.add_bias.astype(np.float64) + delta,
                       view.constant_dtype(layer.bias_add.input[layer.add_index]))
        if isinstance(bias, str):
            return bias
        plan.set_tensor(layer.bias_add, layer.add_index, bias, "bias")
    elif np.any(delta):  # a MatMul without bias: its old output name now comes from a new Add
        bias = cast_to(delta, layer.weight_type)
        if isinstance(bias, str):
            return bias
        plan.outputs.append((node, 0, view.names(f"{node.output[0]}/unbiased")))
        plan.add_bias = (node, bias, node.output[0])
    plan.rewire.append((reader, 0, aff.x))
    return plan
