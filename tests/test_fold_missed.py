"""Exact folds that were missed (issue 7): a BN behind or before an Identity, and LeViT's token
batch norm (MatMul on [B, N, C] -> Reshape/Flatten to [B*N, C] -> BN -> Reshape back)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builders import (
    GraphBuilder,
    count_ops,
    fold_checked,
    folds,
    kept_reason,
    random_feeds,
)


# --- Identity between a BN and its layer ---------------------------------------------------

def layer_identity_bn(op: str, identities: int = 1, *, shared: bool = False) -> onnx.ModelProto:
    """x -> Conv | Gemm | MatMul -> Identity x `identities` -> BN -> y (with `shared`, the last
    Identity's output is read by a Relu too: output "z")."""
    b = GraphBuilder(seed=0)
    if op == "Conv":
        x = b.input("x", ["batch", 4, 9, 7])
        y = b.node("Conv", [x, b.weight("W", [6, 4, 3, 3]), b.weight("B", [6], fan_in=1)],
                   name="layer", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    elif op == "Gemm":
        x = b.input("x", ["batch", 4])
        y = b.node("Gemm", [x, b.weight("W", [6, 4]), b.weight("B", [6], fan_in=1)],
                   name="layer", transB=1)
    else:
        x = b.input("x", ["batch", 4])
        y = b.node("MatMul", [x, b.weight("W", [4, 6])], name="layer")
    for i in range(identities):
        y = b.node("Identity", [y], name=f"identity{i}")
    if shared:
        b.node("Relu", [y], name="relu", outputs=["z"])
    b.bn(y, 6, name="bn", out="y")
    b.output("y", *(["z"] if shared else []))
    return b.build()


@pytest.mark.parametrize("identities", [1, 2])
@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
def test_bn_after_an_identity_folds_backward(op, identities):
    model = layer_identity_bn(op, identities)
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "backward", "layer")]
    expected = Counter({op: 1}) + (Counter(Add=1) if op == "MatMul" else Counter())
    assert count_ops(folded) == expected  # the Identity nodes went with the BN


def test_bn_after_an_identity_read_elsewhere_is_refused():
    model = layer_identity_bn("Conv", shared=True)
    _, report = fold_checked(model)
    assert "other consumers" in kept_reason(report)


def relu_bn_identity_layer(op: str, *, flatten: bool = False) -> onnx.ModelProto:
    """x -> Relu -> BN -> Identity [-> Flatten -> Identity] -> Gemm | MatMul | Conv -> y."""
    b = GraphBuilder(seed=0)
    shape = ["batch", 4, 3, 2] if flatten or op == "Conv" else ["batch", 4]
    x = b.node("Relu", [b.input("x", shape)], name="relu")
    y = b.node("Identity", [b.bn(x, 4, name="bn")], name="identity0")
    k = 4
    if flatten:
        y = b.node("Flatten", [y], name="flatten", axis=1)
        y = b.node("Identity", [y], name="identity1")
        k = 24
    if op == "Gemm":
        b.node("Gemm", [y, b.weight("W", [6, k]), b.weight("B", [6], fan_in=1)], name="layer",
               transB=1, outputs=["y"])
    elif op == "MatMul":
        b.node("MatMul", [y, b.weight("W", [k, 6])], name="layer", outputs=["y"])
    else:
        b.node("Conv", [y, b.weight("W", [6, 4, 1, 1])], name="layer", kernel_shape=[1, 1],
               outputs=["y"])
    b.output("y")
    return b.build()


@pytest.mark.parametrize("op,flatten", [("Gemm", False), ("MatMul", False), ("Conv", False),
                                        ("Gemm", True)])
def test_bn_before_an_identity_folds_forward(op, flatten):
    model = relu_bn_identity_layer(op, flatten=flatten)
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "forward", "layer")]
    assert count_ops(folded)["BatchNormalization"] == 0


# --- LeViT's token batch norm --------------------------------------------------------------

def token_bn(*, via: str = "Reshape", tokens=(5,), c: int = 6, bias: bool = False,
             shape_reader: bool = True, flat_shape=None) -> onnx.ModelProto:
    """x[batch, *tokens, 4] -> MatMul(W[4, c]) [-> Add] -> Reshape([-1, c]) | Flatten(axis=-1)
    -> BN(c) -> Reshape back to the MatMul output's Shape (read by a Shape node, as torch's
    `reshape_as` exports it)."""
    b = GraphBuilder(seed=0)
    x = b.input("x", ["batch", *tokens, 4])
    y = b.node("MatMul", [x, b.weight("W", [4, c])], name="matmul")
    if bias:
        y = b.node("Add", [b.weight("B", [c], fan_in=1), y], name="add")
    if via == "Flatten":
        flat = b.node("Flatten", [y], name="flatten", axis=len(tokens) + 1)
    else:
        shape = np.array(flat_shape or [-1, c], dtype=np.int64)
        flat = b.node("Reshape", [y, b.const("flat_shape", shape)], name="flatten")
    z = b.bn(flat, int(shape[-1]) if via != "Flatten" and flat_shape else c, name="bn")
    back = b.node("Shape", [y], name="shape") if shape_reader else \
        b.const("back", np.array([-1, *tokens, c], dtype=np.int64))
    b.node("Reshape", [z, back], name="unflatten", outputs=["y"])
    b.output("y")
    return b.build()


@pytest.mark.parametrize("via", ["Reshape", "Flatten"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("tokens", [(5,), (3, 2)], ids=["BNC", "BHWC"])
def test_token_bn_folds_into_the_matmul_before_the_reshape(via, bias, tokens):
    model = token_bn(via=via, bias=bias, tokens=tokens)
    feeds = [random_feeds(model, seed=i, dims={"batch": n}) for i, n in enumerate((1, 3))]
    folded, report = fold_checked(model, feeds)
    assert folds(report) == [("bn", "backward", "matmul")]
    ops = count_ops(folded)
    assert ops["BatchNormalization"] == 0 and ops["Add"] == 1  # the new bias Add, or the old one
    add = next(n for n in folded.graph.node if n.op_type == "Add")
    flatten = next(n for n in folded.graph.node if n.name == "flatten")
    assert add.output[0] == flatten.input[0]  # the shift is added before the Reshape


def test_token_bn_without_shape_reader_folds():
    _, report = fold_checked(token_bn(shape_reader=False))
    assert folds(report) == [("bn", "backward", "matmul")]


def test_reshape_that_merges_the_feature_axis_is_refused():
    """[batch, 5, 4] @ W -> [batch, 5, 6] -> Reshape [-1, 30]: BN(30) is not per MatMul feature."""
    _, report = fold_checked(token_bn(flat_shape=[-1, 30], shape_reader=False))
    assert "does not merge leading axes" in kept_reason(report)


def test_token_reshape_after_a_conv_is_refused():
    b = GraphBuilder(seed=0)
    x = b.input("x", ["batch", 4, 3, 2])
    y = b.node("Conv", [x, b.weight("W", [6, 4, 1, 1])], name="conv", kernel_shape=[1, 1])
    y = b.node("Reshape", [y, b.const("s", np.array([-1, 2], dtype=np.int64))], name="flatten")
    b.bn(y, 2, name="bn", out="y")
    b.output("y")
    _, report = fold_checked(b.build())
    assert "is not a MatMul" in kept_reason(report)


def test_token_bn_with_another_reader_of_the_matmul_output_is_refused():
    model = token_bn(shape_reader=False)
    relu = helper.make_node("Relu", ["matmul_out"], ["z"], name="relu")
    model.graph.node.append(relu)
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT,
                                                            ["batch", 5, 6]))
    _, report = fold_checked(model)
    assert "other consumers" in kept_reason(report)
