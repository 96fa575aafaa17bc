"""Backward folds: a linear layer followed by BN becomes the layer with scaled weights and bias.

Every test goes through `fold_checked`, which asserts the invariants of any fold (input not
mutated, onnx.checker, unchanged interface, one decision per BN, no dead constants, outputs equal
to the unoptimised original in onnxruntime); the tests add how many BNs folded, into what, and
the op counts after.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from onnx import numpy_helper

from builders import (
    BN,
    NP_DTYPE,
    GraphBuilder,
    affine_chain,
    assert_no_less_accurate,
    assert_rounded_from,
    bn_affine,
    conv_bn,
    conv_bn_relu_bn_conv,
    conv_transpose_bn,
    count_ops,
    find_node,
    fold_checked,
    folds,
    gemm_bn,
    if_bn,
    loop_bn,
    matmul_bn,
    producer,
    random_feeds,
    run_model,
    shared_weight_convs,
    stored_bn_params,
    tensor_value,
    trained_bn_params,
    ulp,
)


# --- Conv ---------------------------------------------------------------------------------

CONV_LAYOUTS = {  # name: (c_in, c_out, group)
    "plain": (4, 6, 1),
    "grouped": (4, 6, 2),
    "depthwise": (4, 4, 4),
    "depthwise_x2": (4, 8, 4),  # channel multiplier 2
}


@pytest.mark.parametrize("layout", CONV_LAYOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("rank", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_conv_bn_folds_into_conv(rank, bias, layout):
    c_in, c_out, group = CONV_LAYOUTS[layout]
    model = conv_bn(rank=rank, c_in=c_in, c_out=c_out, group=group, bias=bias)
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "backward", "conv")]
    assert count_ops(folded) == Counter(Conv=1)
    conv = find_node(folded, "Conv")
    assert len(conv.input) == 3, "a bias must be added when the Conv had none"
    assert conv.output[0] == "y", "the folded Conv must produce the BN's graph output"


@pytest.mark.parametrize("tail", ["Relu", "Sigmoid"])
def test_conv_bn_followed_by_activation(tail):
    model = conv_bn(tail=tail)
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "backward", "conv")]
    assert count_ops(folded) == Counter({"Conv": 1, tail: 1})
    assert find_node(folded, tail).input[0] == find_node(folded, "Conv").output[0]


@pytest.mark.parametrize("epsilon", [None, 1e-3, 0.1])
def test_conv_bn_epsilon_attribute_and_default(epsilon):
    attrs = {} if epsilon is None else {"epsilon": epsilon}
    model = conv_bn(**attrs)
    folded, report = fold_checked(model)
    assert len(report.folded) == 1
    assert count_ops(folded) == Counter(Conv=1)


# --- ConvTranspose ------------------------------------------------------------------------

CONV_TRANSPOSE_LAYOUTS = {  # name: (c_in, c_out, group); weight is [c_in, c_out/group, k...]
    "plain": (4, 6, 1),
    "grouped": (4, 6, 2),
    "grouped_shrinking": (6, 4, 2),
    "depthwise_x2": (4, 8, 4),
}


@pytest.mark.parametrize("layout", CONV_TRANSPOSE_LAYOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("rank", [1, 2], ids=["1d", "2d"])
def test_conv_transpose_bn_folds_into_conv_transpose(rank, bias, layout):
    c_in, c_out, group = CONV_TRANSPOSE_LAYOUTS[layout]
    model = conv_transpose_bn(rank=rank, c_in=c_in, c_out=c_out, group=group, bias=bias)
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "backward", "convt")]
    assert count_ops(folded) == Counter(ConvTranspose=1)
    convt = find_node(folded, "ConvTranspose")
    assert len(convt.input) == 3 and convt.output[0] == "y"


def test_conv_transpose_grouped_scales_output_channels_not_weight_axis_1():
    """Weight [C_in, M/group, k, k]: output channel o = g*(M/group) + j for input group g."""
    model = conv_transpose_bn(c_in=4, c_out=6, group=2, bias=False)
    folded, _ = fold_checked(model)
    original_w = tensor_value(model, "convt_W").astype(np.float64)
    s, t = bn_affine(stored_bn_params(model))
    convt = find_node(folded, "ConvTranspose")
    per_group = 6 // 2
    expected_w = np.concatenate([
        original_w[g * 2:(g + 1) * 2] * s[g * per_group:(g + 1) * per_group][None, :, None, None]
        for g in range(2)])
    assert_rounded_from(tensor_value(folded, convt.input[1]), expected_w, "fp32")
    assert_rounded_from(tensor_value(folded, convt.input[2]), t, "fp32")


# --- Gemm ---------------------------------------------------------------------------------

GEMM_C = [None, "scalar", "n", "1n", "m1", "mn"]


@pytest.mark.parametrize("c", GEMM_C, ids=lambda c: f"C={c}")
@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0], ids=lambda b: f"beta={b}")
@pytest.mark.parametrize("trans_b", [0, 1], ids=["B", "Bt"])
@pytest.mark.parametrize("trans_a", [0, 1], ids=["A", "At"])
def test_gemm_bn_folds_into_gemm(trans_a, trans_b, beta, c):
    m = 3 if c in ("m1", "mn") else "batch"  # C [M, 1] and [M, N] need a static M
    model = gemm_bn(m=m, trans_a=trans_a, trans_b=trans_b, alpha=0.7, beta=beta, c=c)
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "backward", "gemm")]
    assert count_ops(folded) == Counter(Gemm=1)
    gemm = find_node(folded, "Gemm")
    assert len(gemm.input) == 3, "the BN shift needs a C input"
    assert gemm.output[0] == "y"


def test_gemm_bn_with_default_attributes():
    model = gemm_bn()  # no transA/transB/alpha/beta attributes: spec defaults apply
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "backward", "gemm")]
    assert count_ops(folded) == Counter(Gemm=1)


@pytest.mark.parametrize("tail", ["Relu", "Softmax"])
def test_gemm_bn_followed_by_another_node(tail):
    folded, report = fold_checked(gemm_bn(alpha=2.0, beta=0.5, trans_b=1, tail=tail))
    assert folds(report) == [("bn", "backward", "gemm")]
    assert count_ops(folded) == Counter({"Gemm": 1, tail: 1})


# --- MatMul -------------------------------------------------------------------------------


def test_matmul_rank2_bn_folds_into_matmul():
    model = matmul_bn()
    folded, report = fold_checked(model)
    assert len(report.folded) == 1 and report.folded[0].direction == "backward"
    counts = count_ops(folded)
    # The shift needs a bias: an Add after the MatMul (or the pair as one Gemm).
    assert counts in (Counter(MatMul=1, Add=1), Counter(Gemm=1)), counts
    assert producer(folded, "y").op_type in ("Add", "Gemm")


@pytest.mark.parametrize("side", ["right", "left"], ids=["Add(mm,b)", "Add(b,mm)"])
def test_matmul_add_bn_folds_into_both(side):
    model = matmul_bn(bias=side)
    folded, report = fold_checked(model)
    assert len(report.folded) == 1 and report.folded[0].direction == "backward"
    assert count_ops(folded) == Counter(MatMul=1, Add=1)
    assert producer(folded, "y").op_type == "Add"


# --- opsets and BN variants ---------------------------------------------------------------


@pytest.mark.parametrize("opset,attrs", [
    (7, {}),
    (7, {"spatial": 1}),
    (7, {"spatial": 1, "epsilon": 1e-3, "momentum": 0.99}),
    (9, {}),
    (9, {"epsilon": 1e-3}),
    (14, {}),
    (14, {"training_mode": 0}),
    (15, {}),
    (15, {"training_mode": 0, "epsilon": 1e-4}),
], ids=lambda v: str(v) if isinstance(v, int) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_conv_bn_folds_in_every_bn_opset(opset, attrs):
    model = conv_bn(opset=opset, **attrs)
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "backward", "conv")]
    assert count_ops(folded) == Counter(Conv=1)
    assert [(o.domain, o.version) for o in folded.opset_import] == \
        [(o.domain, o.version) for o in model.opset_import], "opset imports must stay"


@pytest.mark.parametrize("x_dtype,scale_dtype,stats_dtype", [
    ("fp32", "fp32", "fp16"),
    ("fp32", "fp32", "fp64"),
    ("fp16", "fp32", "fp32"),
    ("fp16", "fp32", "fp16"),
    ("fp16", "fp32", "fp64"),
])
def test_bn15_parameter_types_differing_from_x(x_dtype, scale_dtype, stats_dtype):
    """BN-15: scale/bias (T1) and mean/var (T2) may have types other than X (T)."""
    model = conv_bn(opset=15, dtype=x_dtype, bn_dtype=scale_dtype, mean_var_dtype=stats_dtype)
    folded, report = fold_checked(model, dtype=x_dtype)
    assert folds(report) == [("bn", "backward", "conv")]
    assert count_ops(folded) == Counter(Conv=1)
    conv = find_node(folded, "Conv")
    for name in conv.input[1:]:
        assert tensor_value(folded, name).dtype == tensor_value(model, "conv_W").dtype, \
            "folded weights keep the Conv's dtype"


# --- constants from Constant nodes --------------------------------------------------------


def test_bn_parameters_from_constant_nodes():
    model = conv_bn(bn_params="constant")
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "backward", "conv")]
    assert count_ops(folded) == Counter(Conv=1), "the BN's Constant nodes must be removed"


def test_weights_and_bn_parameters_from_constant_nodes():
    model = conv_bn(weights="constant", bn_params="constant")
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "backward", "conv")]
    counts = count_ops(folded)
    assert counts[BN] == 0 and counts["Conv"] == 1
    assert counts["Constant"] <= 2, "at most the new W and B may remain Constant nodes"
    assert set(counts) <= {"Conv", "Constant"}


# --- dtypes -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_conv_bn_folds_in_weight_dtype_computed_in_float64(dtype, bias):
    model = conv_bn(dtype=dtype, bias=bias, opset=22)  # Conv accepts bf16 from opset 22
    folded, report = fold_checked(model, dtype=dtype)
    assert folds(report) == [("bn", "backward", "conv")]
    assert count_ops(folded) == Counter(Conv=1)
    s, t = bn_affine(stored_bn_params(model))
    conv = find_node(folded, "Conv")
    w = tensor_value(model, "conv_W").astype(np.float64)
    b = tensor_value(model, "conv_B").astype(np.float64) if bias else 0.0
    assert_rounded_from(tensor_value(folded, conv.input[1]), w * s[:, None, None, None], dtype)
    assert_rounded_from(tensor_value(folded, conv.input[2]), b * s + t, dtype)


def _bf16_double_rounding_cases(count: int, epsilon: float, rng):
    """`count` (gamma, var, w), all bf16 values, where w * gamma / sqrt(var + eps) rounded to bf16
    via float32 (ml_dtypes' float64 -> bf16 cast) is not the nearest bf16: float32 lands on a bf16
    tie that the float64 value is not on."""
    grid = np.arange(0, 0x7F80, dtype=np.uint16).view(NP_DTYPE["bf16"]).astype(np.float64)
    ws = grid[(grid >= 0.02) & (grid <= 1.0)]
    ws = np.concatenate([ws, -ws])
    gamma = rng.uniform(0.5, 2.0, 8000).astype(NP_DTYPE["bf16"]).astype(np.float64)
    var = rng.uniform(0.3, 3.0, 8000).astype(NP_DTYPE["bf16"]).astype(np.float64)
    exact = (gamma / np.sqrt(var + epsilon))[:, None] * ws[None, :]
    twice = exact.astype(np.float32).astype(NP_DTYPE["bf16"])
    err = np.abs(twice.astype(np.float64) - exact)
    wrong = err > 0.5 * ulp(exact, "bf16")
    rows = np.flatnonzero(wrong.any(axis=1))[:count]
    assert len(rows) == count, "search too small"
    return [(gamma[r], var[r], ws[np.flatnonzero(wrong[r])[0]]) for r in rows]


def test_bf16_weights_are_rounded_once_from_float64():
    """Regression guard: casting float64 to bf16 through float32 rounds twice and can pick the
    wrong neighbour; the folded weights must be the nearest bf16 to the float64 product."""
    epsilon = float(np.float32(1e-5))
    cases = _bf16_double_rounding_cases(6, epsilon, np.random.default_rng(0))
    params = trained_bn_params(6, np.random.default_rng(1))
    params["scale"] = np.array([g for g, _, _ in cases])
    params["var"] = np.array([v for _, v, _ in cases])
    model = conv_bn(dtype="bf16", opset=22, bias=False, bn_values=params, epsilon=epsilon)
    weight = next(t for t in model.graph.initializer if t.name == "conv_W")
    w = numpy_helper.to_array(weight).copy()
    w[:, 0, 0, 0] = [x for _, _, x in cases]  # one knife-edge weight per output channel
    weight.CopyFrom(numpy_helper.from_array(w, "conv_W"))
    folded, report = fold_checked(model, dtype="bf16")
    assert len(report.folded) == 1
    s, _ = bn_affine(stored_bn_params(model), epsilon)
    conv = find_node(folded, "Conv")
    assert_rounded_from(tensor_value(folded, conv.input[1]),
                        w.astype(np.float64) * s[:, None, None, None], "bf16")


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp64"])
def test_gemm_bn_folds_in_weight_dtype(dtype):
    model = gemm_bn(dtype=dtype, c="n")
    folded, report = fold_checked(model, dtype=dtype)
    assert folds(report) == [("bn", "backward", "gemm")]
    assert count_ops(folded) == Counter(Gemm=1)
    s, t = bn_affine(stored_bn_params(model))
    gemm = find_node(folded, "Gemm")
    w = tensor_value(model, "gemm_B").astype(np.float64)
    c = tensor_value(model, "gemm_C").astype(np.float64)
    assert_rounded_from(tensor_value(folded, gemm.input[1]), w * s[None, :], dtype)
    assert_rounded_from(tensor_value(folded, gemm.input[2]), c * s + t, dtype)


def _scales_at_most_one(model):
    """`model` with its BN's gamma shrunk so that every |s| <= 1: in fp16 a backward fold whose
    shift stays in a separate Add is refused otherwise (the MatMul output grows by s first)."""
    s, _ = bn_affine(stored_bn_params(model))
    for tensor in model.graph.initializer:
        if tensor.name == "bn_scale":
            gamma = numpy_helper.to_array(tensor)
            shrunk = gamma.astype(np.float64) * (0.9 / np.max(np.abs(s)))
            tensor.CopyFrom(numpy_helper.from_array(shrunk.astype(gamma.dtype), tensor.name))
    return model


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp64"])
def test_matmul_add_bn_folds_in_weight_dtype(dtype):
    model = matmul_bn(dtype=dtype, bias="right")
    if dtype == "fp16":
        model = _scales_at_most_one(model)
    folded, report = fold_checked(model, dtype=dtype)
    assert len(report.folded) == 1
    assert count_ops(folded) == Counter(MatMul=1, Add=1)


@pytest.mark.parametrize("build", [
    lambda: conv_bn(dtype="fp16"),
    lambda: conv_bn(dtype="fp16", c_in=4, c_out=8, group=4),
    lambda: gemm_bn(dtype="fp16", trans_b=1, alpha=0.7, beta=0.5),
    lambda: _scales_at_most_one(matmul_bn(dtype="fp16", bias="right")),
], ids=["conv", "depthwise", "gemm", "matmul_add"])
def test_fp16_fold_is_no_less_accurate_than_the_original(build):
    model = build()
    folded, report = fold_checked(model, dtype="fp16")
    assert len(report.folded) == 1
    for seed in range(3):
        assert_no_less_accurate(model, folded, random_feeds(model, seed), "fp16")


# --- IR version 3 -------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_ir3_model_with_initializers_listed_as_inputs_folds(bias):
    """IR < 4: every initializer must be a graph input; they are constants all the same."""
    model = conv_bn(opset=7, ir_version=3, bias=bias)
    assert {t.name for t in model.graph.initializer} <= {i.name for i in model.graph.input}
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "backward", "conv")]
    assert count_ops(folded) == Counter(Conv=1)
    assert folded.ir_version == 3
    inputs = {i.name for i in folded.graph.input}
    missing = [t.name for t in folded.graph.initializer if t.name not in inputs]
    assert not missing, f"IR 3: new initializers must be listed as graph inputs: {missing}"
    assert not [t.name for t in folded.graph.initializer if t.name.startswith("bn_")], \
        "unused BN parameters must be removed"


# --- BN output is a graph output ----------------------------------------------------------


@pytest.mark.parametrize("build,layer", [
    (conv_bn, "Conv"),
    (conv_transpose_bn, "ConvTranspose"),
    (lambda: gemm_bn(c=None), "Gemm"),
    (lambda: matmul_bn(bias="left"), "Add"),
], ids=["conv", "conv_transpose", "gemm", "matmul_add"])
def test_folded_layer_produces_the_bn_graph_output_name(build, layer):
    model = build()
    assert producer(model, "y").op_type == BN
    folded, report = fold_checked(model)
    assert len(report.folded) == 1
    assert producer(folded, "y").op_type == layer
    assert [o.name for o in folded.graph.output] == ["y"]


# --- subgraphs ----------------------------------------------------------------------------


def test_bn_in_both_if_branches_folds():
    model = if_bn()
    feeds = [dict(random_feeds(model), cond=np.array(flag)) for flag in (True, False)]
    folded, report = fold_checked(model, feeds)
    assert folds(report) == [("else_bn", "backward", "else_conv"),
                             ("then_bn", "backward", "then_conv")]
    assert all(d.graph != "main" for d in report.folded)
    assert sorted("then_branch" in d.graph for d in report.folded) == [False, True]
    assert count_ops(folded) == Counter(If=1, Conv=2)


def test_bn_in_loop_body_folds():
    model = loop_bn()
    folded, report = fold_checked(model)
    assert folds(report) == [("body_bn", "backward", "body_conv")]
    assert report.folded[0].graph != "main"
    assert count_ops(folded) == Counter(Loop=1, Conv=1, Relu=1, Identity=1)


# --- shared weights -----------------------------------------------------------------------


def test_shared_weight_is_not_scaled_in_place_for_the_other_conv():
    model = shared_weight_convs(both_bn=False)
    folded, report = fold_checked(model)
    assert folds(report) == [("bn_a", "backward", "conv_a")]
    assert count_ops(folded) == Counter(Conv=2)
    conv_a = next(n for n in folded.graph.node if n.name == "conv_a")
    conv_b = next(n for n in folded.graph.node if n.name == "conv_b")
    assert list(conv_b.input) == ["x", "shared_W", "shared_B"]
    for name in ("shared_W", "shared_B"):
        np.testing.assert_array_equal(tensor_value(folded, name), tensor_value(model, name))
    assert conv_a.input[1] != "shared_W" and conv_a.input[2] != "shared_B"
    # And conv_b's output is bit-for-bit what it was.
    feeds = random_feeds(model)
    np.testing.assert_array_equal(run_model(folded, feeds)["yb"], run_model(model, feeds)["yb"])


def test_shared_weight_with_a_bn_after_each_conv_folds_both():
    model = shared_weight_convs(both_bn=True)
    folded, report = fold_checked(model)
    assert folds(report) == [("bn_a", "backward", "conv_a"), ("bn_b", "backward", "conv_b")]
    assert count_ops(folded) == Counter(Conv=2)
    conv_a, conv_b = (next(n for n in folded.graph.node if n.name == name)
                      for name in ("conv_a", "conv_b"))
    assert conv_a.input[1] != conv_b.input[1], "each Conv needs its own scaled weight"


# --- chains -------------------------------------------------------------------------------


def test_chain_conv_bn_relu_bn_conv_folds_to_no_bn():
    model = conv_bn_relu_bn_conv()
    folded, report = fold_checked(model)
    assert folds(report) == [("bn1", "backward", "conv1"), ("bn2", "forward", "conv2")]
    assert count_ops(folded) == Counter(Conv=2, Relu=1)


def test_two_bns_in_a_row_after_a_conv_both_fold():
    """Conv -> BN -> BN: once the first is folded the second is Conv -> BN too (fixpoint)."""
    model = conv_bn(tail="bn")
    assert count_ops(model)[BN] == 2
    folded, report = fold_checked(model)
    assert len(report.folded) == 2
    assert count_ops(folded) == Counter(Conv=1)


def test_weight_read_twice_by_the_same_gemm_is_not_scaled_in_place():
    # Gemm(A, W, W): B and C are one initializer. Scaling it in place for B would also change C.
    b = GraphBuilder(seed=3)
    x = b.input("x", [4, 4])  # C = W is [4, 4]: M must be 4
    w = b.weight("W", (4, 4))
    y = b.node("Gemm", [x, w, w], name="gemm", beta=0.5)
    b.output(b.bn(y, 4, name="bn", out="y"))
    model = b.build()
    folded, report = fold_checked(model)
    assert folds(report) == [("bn", "backward", "gemm")]
    assert count_ops(folded) == Counter(Gemm=1)
    gemm = find_node(folded, "Gemm")
    assert gemm.input[1] != gemm.input[2]


def test_two_bns_folding_into_the_same_conv_in_one_scan():
    # bn_b folds forward into conv2 and bn_c backward into it: planned on the same view, the
    # second plan would rewrite conv2 from stale weights; it must wait for a fresh view.
    b = GraphBuilder(seed=11)
    x = b.input("x", ["batch", 3, 9, 7])
    y = b.node("Conv", [x, b.weight("conv1_W", [4, 3, 3, 3])], name="conv1", kernel_shape=[3, 3])
    y = b.node("Relu", [b.bn(y, 4, name="bn_a")], name="relu")
    y = b.bn(y, 4, name="bn_b")
    y = b.node("Conv", [y, b.weight("conv2_W", [6, 4, 1, 1])], name="conv2", kernel_shape=[1, 1])
    b.output(b.bn(y, 6, name="bn_c", out="y"))
    model = b.build()
    folded, report = fold_checked(model)
    assert folds(report) == [("bn_a", "backward", "conv1"), ("bn_b", "forward", "conv2"),
                             ("bn_c", "backward", "conv2")]
    assert count_ops(folded) == Counter(Conv=2, Relu=1)


def test_a_plan_reaching_a_layer_rewritten_earlier_in_the_scan_waits_for_a_fresh_view():
    # BN nodes are tried before affine chains: bn folds backward into fc first; the chain two
    # nodes upstream (through the Flatten) then plans a forward fold into the same fc.
    b = GraphBuilder(seed=12)
    x = b.input("x", ["batch", 3, 4, 5])
    y = b.node("Relu", [x], name="relu")
    y = affine_chain(b, y, ("Mul", "Add"), (1, 3, 1, 1), name="chain")
    y = b.node("Flatten", [y], name="flatten")
    y = b.node("Gemm", [y, b.weight("fc_W", [60, 7])], name="fc")
    b.output(b.bn(y, 7, name="bn", out="y"))
    model = b.build()
    folded, report = fold_checked(model)
    assert sorted((d.node, d.direction, d.into) for d in report.folded) == [
        ("bn", "backward", "fc"), ("chain_mul0", "forward", "fc")]
    assert count_ops(folded) == Counter(Relu=1, Flatten=1, Gemm=1)



def test_a_refusal_planned_on_a_stale_view_is_not_taken_for_an_answer():
    # `up` folds forward into fc1 and gives it a new bias input; `down`, planned on the same
    # scan's view, would read that bias as not constant, refuse the backward fold and fold
    # forward into fc2 instead. It must wait for a fresh view and fold backward into fc1
    # (whose bias Add then merges into the Gemm's own bias).
    b = GraphBuilder(seed=13)
    x = b.node("Relu", [b.input("x", ["batch", 5])], name="relu0")
    y = affine_chain(b, x, ("Mul", "Add"), (1, 5), name="up")
    y = b.node("Gemm", [y, b.weight("fc1_W", [5, 6])], name="fc1")
    y = b.node("Add", [y, b.weight("fc1_bias", [6], fan_in=1)], name="fc1_add")  # fc1's bias
    y = affine_chain(b, y, ("Sub", "Mul"), (1, 6), name="down")  # two nodes away from fc1
    b.output(b.node("Gemm", [y, b.weight("fc2_W", [6, 3])], name="fc2", outputs=["y"]))
    model = b.build()
    folded, report = fold_checked(model)
    assert sorted((d.node, d.direction, d.into) for d in report.folded) == [
        ("down_sub0", "backward", "fc1"), ("up_mul0", "forward", "fc1")]
    assert count_ops(folded) == Counter(Relu=1, Gemm=2)
