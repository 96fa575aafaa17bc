"""Forward folds: BN after an activation (or on a graph input) folds into the next linear layer.

    W (s*x + t) + b = (W diag(s)) x + (W t + b)

The consumer's input-channel slice of the weight is scaled by s and W t joins its bias. Every
test goes through `fold_checked` (input not mutated, onnx.checker, interface, decisions, no dead
constants, equivalence with the unoptimised original in onnxruntime).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from builders import (
    BN,
    assert_no_less_accurate,
    assert_rounded_from,
    bn_affine,
    bn_conv,
    bn_gemm,
    bn_matmul,
    conv_relu_bn_flatten_gemm,
    count_ops,
    find_node,
    fold_checked,
    folds,
    keras_mlp,
    producer,
    random_feeds,
    stored_bn_params,
    tensor_value,
)


# --- Gemm ---------------------------------------------------------------------------------

GEMM_C_BETA = [  # (C, beta): C absent, present with beta 1, 0.5 and 0, scalar C
    (None, 1.0), ("n", 1.0), ("n", 0.5), ("n", 0.0), ("1n", 0.5), ("scalar", 2.0)]


@pytest.mark.parametrize("c,beta", GEMM_C_BETA, ids=lambda v: str(v))
@pytest.mark.parametrize("alpha", [1.0, 0.7], ids=lambda a: f"alpha={a}")
@pytest.mark.parametrize("trans_b", [0, 1], ids=["B", "Bt"])
@pytest.mark.parametrize("act", ["Relu", None], ids=["after_relu", "on_graph_input"])
def test_bn_folds_forward_into_gemm(act, trans_b, alpha, c, beta):
    model = bn_gemm(act=act, trans_b=trans_b, alpha=alpha, beta=beta, c=c)
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "forward", "gemm")]
    expected = Counter(Gemm=1, Relu=1) if act else Counter(Gemm=1)
    assert count_ops(folded) == expected
    gemm = find_node(folded, "Gemm")
    assert len(gemm.input) == 3, "the BN shift needs a C input"
    assert gemm.input[0] == ("act_out" if act else "x")


def test_forward_gemm_scales_rows_of_b_and_adds_b_t_to_c():
    """Weights checked against a float64 reference: B' = diag(s) B, C' = C + t B (beta 1)."""
    model = bn_gemm(trans_b=0, c="n")
    folded, _ = fold_checked(model)
    s, t = bn_affine(stored_bn_params(model))
    w = tensor_value(model, "gemm_B").astype(np.float64)
    c = tensor_value(model, "gemm_C").astype(np.float64)
    gemm = find_node(folded, "Gemm")
    assert_rounded_from(tensor_value(folded, gemm.input[1]), s[:, None] * w, "fp32")
    assert_rounded_from(tensor_value(folded, gemm.input[2]), c + t @ w, "fp32")


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp64"])
def test_bn_folds_forward_into_gemm_in_weight_dtype(dtype):
    model = bn_gemm(dtype=dtype, trans_b=1, alpha=0.7, beta=0.5)
    folded, report = fold_checked(model, dtype=dtype)
    assert folds(report) == [("bn", "forward", "gemm")]
    assert count_ops(folded) == Counter(Gemm=1, Relu=1)
    if dtype == "fp16":
        for seed in range(3):
            assert_no_less_accurate(model, folded, random_feeds(model, seed), dtype)


# --- MatMul -------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [None, "right", "left"], ids=["no_add", "Add(mm,b)", "Add(b,mm)"])
@pytest.mark.parametrize("act", ["Relu", "Sigmoid", None])
def test_bn_folds_forward_into_matmul(act, bias):
    model = bn_matmul(act=act, bias=bias)
    folded, report = fold_checked(model)
    assert len(report.folded) == 1 and report.folded[0].direction == "forward"
    counts = count_ops(folded)
    assert counts[BN] == 0
    # The shift W t needs a bias: the existing Add, or a new one when there was none.
    expected = Counter(MatMul=1, Add=1, Identity=1) + (Counter({act: 1}) if act else Counter())
    assert counts == expected or counts == expected - Counter(MatMul=1, Add=1) + Counter(Gemm=1)


def test_forward_matmul_weights_match_float64_reference():
    model = bn_matmul(bias="right")
    folded, _ = fold_checked(model)
    s, t = bn_affine(stored_bn_params(model))
    w = tensor_value(model, "mm_W").astype(np.float64)
    b = tensor_value(model, "add_B").astype(np.float64)
    matmul = find_node(folded, "MatMul")
    add = find_node(folded, "Add")
    assert_rounded_from(tensor_value(folded, matmul.input[1]), s[:, None] * w, "fp32")
    bias_name = next(i for i in add.input if i != matmul.output[0])
    assert_rounded_from(tensor_value(folded, bias_name), b + t @ w, "fp32")


# --- Conv ---------------------------------------------------------------------------------

FORWARD_CONV_LAYOUTS = {  # name: (c_in, c_out, group)
    "plain": (4, 6, 1),
    "grouped": (4, 6, 2),
    "depthwise_x2": (4, 8, 4),
    "grouped_shrinking": (6, 4, 2),
}


@pytest.mark.parametrize("layout", FORWARD_CONV_LAYOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("act", ["Relu", None], ids=["after_relu", "on_graph_input"])
def test_bn_folds_forward_into_conv_without_padding(act, bias, layout):
    c_in, c_out, group = FORWARD_CONV_LAYOUTS[layout]
    model = bn_conv(act=act, c_in=c_in, c_out=c_out, group=group, bias=bias, pads=0)
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "forward", "conv")]
    assert count_ops(folded) == (Counter(Conv=1, Relu=1) if act else Counter(Conv=1))
    conv = find_node(folded, "Conv")
    assert len(conv.input) == 3, "the BN shift needs a Conv bias"
    assert conv.output[0] == "y"


def test_forward_grouped_conv_scales_input_channels_per_group():
    """Input channel ch = g*(C/group) + c within group g: weight[o, c] * s[g*(C/group) + c]."""
    c_in, c_out, group = 4, 6, 2
    model = bn_conv(c_in=c_in, c_out=c_out, group=group, bias=False)
    folded, _ = fold_checked(model)
    s, t = bn_affine(stored_bn_params(model))
    w = tensor_value(model, "conv_W").astype(np.float64)  # [6, 2, 3, 3]
    per_in, per_out = c_in // group, c_out // group
    expected_w = np.empty_like(w)
    expected_b = np.empty(c_out)
    for o in range(c_out):
        g = o // per_out
        channels = slice(g * per_in, (g + 1) * per_in)
        expected_w[o] = w[o] * s[channels][:, None, None]
        expected_b[o] = np.sum(w[o] * t[channels][:, None, None])
    conv = find_node(folded, "Conv")
    assert_rounded_from(tensor_value(folded, conv.input[1]), expected_w, "fp32")
    assert_rounded_from(tensor_value(folded, conv.input[2]), expected_b, "fp32")


@pytest.mark.parametrize("auto_pad", ["VALID", "NOTSET"])
def test_bn_folds_forward_into_conv_with_explicit_no_padding(auto_pad):
    model = bn_conv(auto_pad=auto_pad)
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "forward", "conv")]
    assert count_ops(folded) == Counter(Conv=1, Relu=1)


@pytest.mark.parametrize("pads,auto_pad", [(1, None), (0, "SAME_UPPER")], ids=["pads1", "same"])
def test_scale_only_bn_folds_forward_into_padded_conv(pads, auto_pad):
    """With t = 0 the padded zeros stay zero: the forward fold is exact despite padding."""
    model = bn_conv(pads=pads, auto_pad=auto_pad, zero_shift=True)
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "forward", "conv")]
    assert count_ops(folded) == Counter(Conv=1, Relu=1)


# --- through Flatten / Reshape ------------------------------------------------------------


@pytest.mark.parametrize("trans_b", [1, 0], ids=["Bt", "B"])
@pytest.mark.parametrize("via", ["Flatten", "Reshape0", "Reshape"],
                         ids=["flatten", "reshape[0,-1]", "reshape[-1,CHW]"])
def test_bn_folds_forward_through_flatten_into_gemm(via, trans_b):
    """Conv -> Relu -> BN -> Flatten -> Gemm: channel c is the feature block c*H*W..."""
    model = conv_relu_bn_flatten_gemm(via=via, trans_b=trans_b)
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "forward", "gemm")]
    shape_op = "Flatten" if via == "Flatten" else "Reshape"
    assert count_ops(folded) == Counter({"Conv": 1, "Relu": 1, shape_op: 1, "Gemm": 1})
    assert producer(folded, find_node(folded, "Gemm").input[0]).op_type == shape_op


# --- the seed example ---------------------------------------------------------------------


@pytest.mark.parametrize("dense", ["matmul_add", "gemm"])
def test_keras_mlp_bn_after_relu_folds_into_the_last_dense(dense):
    """Dense(5->16) Relu Dense(16->32) Relu BN Dense(32->2) Softmax, Keras epsilon 1e-3."""
    model = keras_mlp(dense=dense)
    folded, report = fold_checked(model)
    assert len(report.folded) == 1 and report.folded[0].direction == "forward"
    if dense == "gemm":
        assert report.folded[0].into == "dense3"
        assert count_ops(folded) == Counter(Gemm=3, Relu=2, Softmax=1)
    else:
        assert count_ops(folded) == Counter(MatMul=3, Add=3, Relu=2, Softmax=1)
    assert producer(folded, "y").op_type == "Softmax"


def test_keras_mlp_with_several_batches():
    model = keras_mlp()
    feeds = [random_feeds(model, seed, {"batch": batch}) for seed, batch in ((1, 1), (2, 7))]
    folded, report = fold_checked(model, feeds)
    assert len(report.folded) == 1
    assert count_ops(folded)[BN] == 0
