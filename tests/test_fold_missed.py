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
