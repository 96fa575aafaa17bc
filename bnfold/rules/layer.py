"""Linear layers as exporters write them: Conv, ConvTranspose, Gemm, MatMul, each optionally
followed by a bias Add (torch's MatMul+Add for rank-3 inputs, Keras and tf2onnx Dense layers)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.graph import GraphView
from bnfold.nodes import attr, display_name

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Layer:
    view: GraphView
    node: onnx.NodeProto  # the linear op
    weight: np.ndarray  # its input 1, constant
    bias_add: onnx.NodeProto | None = None  # Add(layer output, constant bias) right after it
    add_index: int = 1  # which input of bias_add is the constant
    add_bias: np.ndarray | None = None
    transpose: onnx.NodeProto | None = None  # a layout Transpose after it (Keras: NCHW -> NHWC)
    identities: list[onnx.NodeProto] = field(default_factory=list)  # Identity nodes before the BN
    reshape: onnx.NodeProto | None = None  # a Reshape/Flatten [..., C] -> [rows, C] after it

    @property
    def name(self) -> str:
        return display_name(self.node)

    @property
    def output(self) -> str:
        """The tensor the linear op produces (the rank of all the layer's tensors)."""
        return self.node.output[0]

    @property
    def bias_after_transpose(self) -> bool:
        return (self.transpose is not None and self.bias_add is not None
                and self.transpose.output[0] in self.bias_add.input)

    @property
    def last(self) -> onnx.NodeProto:
        """The node whose output the folded affine map's output name moves to."""
        if self.bias_after_transpose:
            return self.bias_add
        return self.reshape or self.transpose or self.bias_add or self.node

    def perm(self, rank: int) -> list[int]:
        """The layout Transpose's permutation (ONNX's default: reversed axes)."""
        return list(attr(self.transpose, "perm", list(reversed(range(rank)))))

    @property
    def weight_type(self) -> int:
        return self.view.constant_dtype(self.node.input[1])

    def bias_type(self, index: int) -> int:
        """Element type of the layer's own bias input, or of its weight when absent."""
        node = self.node
        if len(node.input) > index and node.input[index]:
            return self.view.constant_dtype(node.input[index])
        return self.weight_type


def constant_weight(view: GraphView, node: onnx.NodeProto) -> np.ndarray | str:
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return f"{display_name(node)} is not a linear layer with a weight"
    value = view.constant(node.input[1])
    if isinstance(value, str):
        return f"weight of {display_name(node)} is not constant: {value}"
    return value


def optional_constant(view: GraphView, node: onnx.NodeProto, index: int) -> np.ndarray | None | str:
    """Input `index` of `node` as a constant, None when absent, or why it is not constant."""
    if len(node.input) <= index or not node.input[index]:
        return None
    value = view.constant(node.input[index])
    if isinstance(value, str):
        return f"bias of {display_name(node)} is not constant: {value}"
    return value


def bias_add_after(view: GraphView, node: onnx.NodeProto) -> tuple[onnx.NodeProto, int, np.ndarray] | None:
    """The Add that adds a constant to `node`'s output and is its only reader, if any."""
    add = view.sole_user(node.output[0])
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    index = 1 if add.input[0] == node.output[0] else 0
    if add.input[1 - index] != node.output[0]:
        return None
    value = view.constant(add.input[index])
    if isinstance(value, str):
        return None
    return add, index, value


def make_layer(view: GraphView, node: onnx.NodeProto, bias_add=None) -> Layer | str:
    weight = constant_weight(view, node)
    if isinstance(weight, str):
        return weight
    if node.op_type == "MatMul" and weight.ndim != 2:
        return f"weight of {display_name(node)} has rank {weight.ndim}, not 2"
    layer = Layer(view, node, weight)
    if bias_add is not None:
        layer.bias_add, layer.add_index, layer.add_bias = bias_add
    return layer


def gemm_attrs(node: onnx.NodeProto) -> tuple[float, float, int, int]:
    return (float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0)),
            int(attr(node, "transA", 0)), int(attr(node, "transB", 0)))
