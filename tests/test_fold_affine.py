"""Affine chains: batch norm as exporters decompose it (issue 3).

Sub / Mul / Add / Div by constants that vary along one axis are one affine map `s*x + t` and fold
like a BatchNormalization node: backward into the linear layer before them (Conv, Gemm,
MatMul(+Add), through a Keras layout Transpose), forward into the one after (Gemm, MatMul), with the
same refusals. No-op Casts (to the input's own type) are seen through and removed.

Every positive test goes through `fold_checked` (input not mutated, onnx.checker full_check,
interface unchanged, no dead constants, outputs equal to the unoptimised original in onnxruntime)
and asserts how many chains folded, in which direction, into what, and the op counts after.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builders import (
    BN,
    CHAIN_FORMS,
    SPATIAL,
    GraphBuilder,
    act_bn_tail,
    act_chain_conv,
    act_chain_linear,
    affine_chain,
    chain_constant,
    conv_bn,
    conv_chain,
    conv_relu_chain_flatten_gemm,
    count_ops,
    find_node,
    fold_checked,
    gemm_chain,
    keras_conv_chain,
    kept_reason,
    matmul_chain,
    noop_cast,
    noop_casts,
    producer,
    random_feeds,
    run_model,
    tensor_value,
    trained_bn_params,
)

FORMS = list(CHAIN_FORMS)


def affine_folds(report) -> list[tuple[str, str | None]]:
    """(direction, layer) of every folded affine chain."""
    return sorted((d.direction, d.into) for d in report.folded if d.op == "affine")


def has_shift(ops) -> bool:
    return any(op in ("Add", "Sub", "RSub") for op in ops)


def assert_chain_folded(model, folded, report, *, direction: str, into: str, expected: Counter):
    """One chain folded `direction` into `into`; the ops after are exactly `expected`; every
    no-op Cast is gone and counted."""
    assert affine_folds(report) == [(direction, into)], [d.describe() for d in report.decisions]
    assert not report.kept, [d.describe() for d in report.kept]
    assert count_ops(folded) == expected
    assert report.removed_casts == noop_casts(model)


def assert_unchanged(model, folded, report):
    """Nothing folded and the graph is the same, node for node and constant for constant."""
    assert not report.folded, [d.describe() for d in report.folded]
    assert report.removed_casts == 0
    assert list(folded.graph.node) == list(model.graph.node)
    assert list(folded.graph.initializer) == list(model.graph.initializer)


def conv_layer(b: GraphBuilder, c_in: int = 4, c_out: int = 6) -> str:
    """Graph input x[batch, c_in, 9, 7] -> Conv(3x3, pads 1, bias) "conv"; returns its output."""
    x = b.input("x", ["batch", c_in, *SPATIAL[2]])
    return b.node("Conv", [x, b.weight("conv_W", [c_out, c_in, 3, 3]),
                           b.weight("conv_B", [c_out], fan_in=1)],
                  name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])


# --- backward into Conv -------------------------------------------------------------------

CONV_LAYOUTS = {"scalar": (), "C11": ("C", 1, 1), "1C11": (1, "C", 1, 1)}


@pytest.mark.parametrize("casts", [False, True], ids=["no_casts", "casts"])
@pytest.mark.parametrize("layout", CONV_LAYOUTS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_chain_folds_backward_into_conv(form, layout, casts, bias):
    model = conv_chain(CHAIN_FORMS[form], CONV_LAYOUTS[layout], casts=casts, bias=bias)
    assert noop_casts(model) == (len(CHAIN_FORMS[form]) if casts else 0)
    folded, report = fold_checked(model)
    assert_chain_folded(model, folded, report, direction="backward", into="conv",
                        expected=Counter(Conv=1))
    conv = find_node(folded, "Conv")
    assert conv.output[0] == "y", "the folded Conv must produce the chain's graph output"
    if bias or has_shift(CHAIN_FORMS[form]):
        assert len(conv.input) == 3 and conv.input[2], "the shift must go into the Conv's bias"


@pytest.mark.parametrize("source", ["initializer", "constant", "identity"])
@pytest.mark.parametrize("left", [False, True], ids=["constant_second", "constant_first"])
def test_chain_constants_from_any_constant_source_fold(source, left):
    """Constants as initializers, Constant nodes or Identity(initializer) (TorchScript's shared
    tensors), and Mul/Add with the constant as first operand."""
    b = GraphBuilder(seed=3)
    y = conv_layer(b)
    affine_chain(b, y, CHAIN_FORMS["sub_mul_add"], (1, 6, 1, 1), out="y", source=source, left=left)
    b.output("y")
    model = b.build()
    folded, report = fold_checked(model)
    assert_chain_folded(model, folded, report, direction="backward", into="conv",
                        expected=Counter(Conv=1))


@pytest.mark.parametrize("dtype", ["fp16", "fp64"])
def test_chain_folds_into_conv_in_its_dtype(dtype):
    """The Casts are no-ops in the model's own float type (Cast to FLOAT16 in an fp16 model)."""
    model = conv_chain(CHAIN_FORMS["sub_mul_add"], (1, "C", 1, 1), casts=True, dtype=dtype)
    assert noop_casts(model) == 3
    folded, report = fold_checked(model)
    assert_chain_folded(model, folded, report, direction="backward", into="conv",
                        expected=Counter(Conv=1))
    conv = find_node(folded, "Conv")
    assert {tensor_value(folded, n).dtype for n in conv.input[1:]} == {
        tensor_value(model, "conv_W").dtype}


@pytest.mark.parametrize("opset,ir_version", [(7, 3), (13, None)], ids=["opset7_ir3", "opset13"])
def test_chain_folds_into_conv_in_older_opsets(opset, ir_version):
    """IR 3 lists every initializer as a graph input: there they are constants all the same."""
    model = conv_chain(CHAIN_FORMS["sub_div_mul_add"], (1, "C", 1, 1), casts=True, opset=opset,
                       ir_version=ir_version)
    folded, report = fold_checked(model)
    assert_chain_folded(model, folded, report, direction="backward", into="conv",
                        expected=Counter(Conv=1))


def test_chain_folds_backward_into_conv_transpose():
    b = GraphBuilder(seed=47)
    x = b.input("x", ["batch", 4, *SPATIAL[2]])
    y = b.node("ConvTranspose", [x, b.weight("convt_W", [4, 3, 3, 3], fan_in=18)],
               name="convt", kernel_shape=[3, 3], strides=[2, 2], group=2)
    affine_chain(b, y, CHAIN_FORMS["sub_mul_add"], (6, 1, 1), out="y", casts=True)
    b.output("y")
    model = b.build()
    folded, report = fold_checked(model)
    assert_chain_folded(model, folded, report, direction="backward", into="convt",
                        expected=Counter(ConvTranspose=1))


def test_zero_in_mul_scale_folds_and_zeroes_the_channel():
    c_out, zero = 6, 2
    rng = np.random.default_rng(5)
    scale = chain_constant("Mul", (1, c_out, 1, 1), rng)
    scale[0, zero, 0, 0] = 0.0
    shift = chain_constant("Add", (1, c_out, 1, 1), rng)
    b = GraphBuilder(seed=5)
    x = b.input("x", ["batch", 4, *SPATIAL[2]])
    y = b.node("Conv", [x, b.weight("conv_W", [c_out, 4, 3, 3]),
                        b.weight("conv_B", [c_out], fan_in=1)],
               name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    affine_chain(b, y, ("Mul", "Add"), (1, c_out, 1, 1), out="y", constants=[scale, shift])
    b.output("y")
    model = b.build()
    folded, report = fold_checked(model)
    assert_chain_folded(model, folded, report, direction="backward", into="conv",
                        expected=Counter(Conv=1))
    conv = find_node(folded, "Conv")
    assert not np.any(tensor_value(folded, conv.input[1])[zero]), "channel weights must be 0"
    out = run_model(folded, random_feeds(model))["y"]
    np.testing.assert_array_equal(out[:, zero], np.float32(shift[0, zero, 0, 0]))


# --- backward into Gemm -------------------------------------------------------------------

DENSE_LAYOUTS = {"scalar": (), "C": ("C",), "1C": (1, "C")}
GEMM_VARIANTS = {  # name: (trans_b, beta, c)
    "plain": (0, 1.0, "n"),
    "transB": (1, 1.0, "n"),
    "beta": (1, 0.5, "1n"),
    "no_c": (0, 1.0, None),
}


@pytest.mark.parametrize("casts", [False, True], ids=["no_casts", "casts"])
@pytest.mark.parametrize("layout", DENSE_LAYOUTS)
@pytest.mark.parametrize("form", FORMS)
def test_chain_folds_backward_into_gemm(form, layout, casts):
    model = gemm_chain(CHAIN_FORMS[form], DENSE_LAYOUTS[layout], casts=casts)
    folded, report = fold_checked(model)
    assert_chain_folded(model, folded, report, direction="backward", into="gemm",
                        expected=Counter(Gemm=1))
    assert find_node(folded, "Gemm").output[0] == "y"


@pytest.mark.parametrize("variant", GEMM_VARIANTS)
def test_chain_folds_backward_into_gemm_variants(variant):
    trans_b, beta, c = GEMM_VARIANTS[variant]
    model = gemm_chain(CHAIN_FORMS["sub_div_mul_add"], (1, "C"), trans_b=trans_b, beta=beta, c=c)
    folded, report = fold_checked(model)
    assert_chain_folded(model, folded, report, direction="backward", into="gemm",
                        expected=Counter(Gemm=1))


# --- backward into MatMul(+Add): Dense on rank 2 and rank 3 -------------------------------

MATMUL_LAYOUTS = {  # the constants vary along the last (feature) axis, or not at all
    2: {"scalar": (), "C": ("C",), "1C": (1, "C")},
    3: {"scalar": (), "C": ("C",), "1C": (1, "C"), "11C": (1, 1, "C")},
}
MATMUL_CASES = [(rank, layout) for rank in MATMUL_LAYOUTS for layout in MATMUL_LAYOUTS[rank]]


@pytest.mark.parametrize("casts", [False, True], ids=["no_casts", "casts"])
@pytest.mark.parametrize("bias", [None, "right", "left"], ids=["no_bias", "bias", "bias_left"])
@pytest.mark.parametrize("rank,layout", MATMUL_CASES, ids=[f"rank{r}-{l}" for r, l in MATMUL_CASES])
@pytest.mark.parametrize("form", FORMS)
def test_chain_folds_backward_into_matmul(form, rank, layout, bias, casts):
    """Keras Dense on [batch, features] and [batch, seq, features]: the feature axis is the
    last one, so constants [F] (and [1, F], [1, 1, F]) fold into W and the bias."""
    ops = CHAIN_FORMS[form]
    model = matmul_chain(ops, MATMUL_LAYOUTS[rank][layout], rank=rank, bias=bias, casts=casts)
    folded, report = fold_checked(model)
    adds = int(bias is not None or has_shift(ops))  # the bias, or a new one for the shift
    assert len(report.folded) == 1 and report.folded[0].op == "affine"
    assert (report.folded[0].direction, report.folded[0].into) == ("backward", "matmul")
    assert not report.kept
    assert count_ops(folded) == Counter(MatMul=1, Add=adds)
    assert report.removed_casts == noop_casts(model)
    assert producer(folded, "y").op_type == ("Add" if adds else "MatMul")


# --- forward into Gemm / MatMul after an activation ---------------------------------------


@pytest.mark.parametrize("casts", [False, True], ids=["no_casts", "casts"])
@pytest.mark.parametrize("layout", DENSE_LAYOUTS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ["gemm", "matmul", "matmul_add"])
def test_chain_after_relu_folds_forward(kind, form, layout, casts):
    ops = CHAIN_FORMS[form]
    model = act_chain_linear(ops, DENSE_LAYOUTS[layout], kind=kind, casts=casts)
    folded, report = fold_checked(model)
    layer = "gemm" if kind == "gemm" else "matmul"
    assert affine_folds(report) == [("forward", layer)]
    assert not report.kept
    after = Counter(Relu=1, Gemm=1) if kind == "gemm" else Counter(Relu=1, MatMul=1, Identity=1)
    if kind == "matmul_add" or (kind == "matmul" and has_shift(ops)):
        after["Add"] = 1  # the bias Add, or a new one for W t
    assert count_ops(folded) == after
    assert report.removed_casts == noop_casts(model)


@pytest.mark.parametrize("layout", [("C",), (1, 1, "C")], ids=["C", "11C"])
def test_chain_after_relu_folds_forward_into_matmul_on_rank3(layout):
    model = act_chain_linear(CHAIN_FORMS["sub_mul_add"], layout, kind="matmul_add", rank=3)
    folded, report = fold_checked(model)
    assert_chain_folded(model, folded, report, direction="forward", into="matmul",
                        expected=Counter(Relu=1, MatMul=1, Add=1, Identity=1))


@pytest.mark.parametrize("layout", list(CONV_LAYOUTS.values()), ids=list(CONV_LAYOUTS))
@pytest.mark.parametrize("via", ["Flatten", "Reshape"])
def test_chain_after_relu_folds_forward_through_flatten_into_gemm(via, layout):
    model = conv_relu_chain_flatten_gemm(CHAIN_FORMS["sub_mul_add"], layout, via=via)
    folded, report = fold_checked(model)
    assert_chain_folded(model, folded, report, direction="forward", into="gemm",
                        expected=Counter({"Conv": 1, "Relu": 1, via: 1, "Gemm": 1}))


@pytest.mark.parametrize("form", FORMS)
def test_chain_after_relu_folds_forward_into_unpadded_conv(form):
    model = act_chain_conv(CHAIN_FORMS[form], (1, "C", 1, 1), pads=0)
    folded, report = fold_checked(model)
    assert_chain_folded(model, folded, report, direction="forward", into="conv",
                        expected=Counter(Relu=1, Conv=1))


def test_scale_only_chain_folds_forward_into_padded_conv():
    model = act_chain_conv(("Mul", "Div"), (1, "C", 1, 1), pads=1)
    folded, report = fold_checked(model)
    assert_chain_folded(model, folded, report, direction="forward", into="conv",
                        expected=Counter(Relu=1, Conv=1))


def test_chain_with_shift_is_not_folded_forward_into_padded_conv():
    model = act_chain_conv(CHAIN_FORMS["sub_mul_add"], (1, "C", 1, 1), pads=1)
    folded, report = fold_checked(model)
    assert "padding" in chain_reason(report)
    assert_unchanged(model, folded, report)


def test_bn_between_transposes_folds_forward_into_matmul():
    """x[B, T, F] -> Relu -> Transpose -> BN(F on axis 1) -> Transpose -> MatMul: BN's axis 1
    is the MatMul's feature axis once transposed back."""
    t, f, n = 7, 4, 6
    b = GraphBuilder(seed=11)
    x = b.node("Relu", [b.input("x", ["batch", t, f])], name="act")
    x = b.node("Transpose", [x], name="to_bft", perm=[0, 2, 1])
    x = b.bn(x, f, name="bn")
    x = b.node("Transpose", [x], name="to_btf", perm=[0, 2, 1])
    y = b.node("MatMul", [x, b.weight("mm_W", [f, n], fan_in=f)], name="matmul")
    b.node("Add", [y, b.weight("mm_B", [n], fan_in=1)], name="add", outputs=["y"])
    b.output("y")
    model = b.build()
    folded, report = fold_checked(model)
    assert [(d.node, d.direction, d.into) for d in report.folded] == [("bn", "forward", "matmul")]
    assert count_ops(folded) == Counter(Relu=1, Transpose=2, MatMul=1, Add=1)


# --- Keras channels-last convolutions -----------------------------------------------------


@pytest.mark.parametrize("casts", [False, True], ids=["no_casts", "casts"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("form", FORMS)
def test_keras_nhwc_chain_folds_into_conv_through_transpose(form, bias, casts):
    """Transpose -> Conv -> Transpose -> Add(bias [1,1,1,C]) -> chain([1,1,1,C]): the whole chain
    (bias included) goes into the Conv's weight and bias; the Transposes stay."""
    model = keras_conv_chain(CHAIN_FORMS[form], bias=bias, casts=casts)
    folded, report = fold_checked(model)
    assert len(report.folded) == 1 and report.folded[0].op == "affine"
    assert (report.folded[0].direction, report.folded[0].into) == ("backward", "conv")
    assert not report.kept
    assert count_ops(folded) == Counter(Transpose=2, Conv=1)
    assert report.removed_casts == noop_casts(model)
    assert producer(folded, "y").op_type == "Transpose"
    conv = find_node(folded, "Conv")
    assert producer(folded, "y").input[0] == conv.output[0]


def dense3d_transposed_norm(*, chain: bool, seed: int = 67) -> onnx.ModelProto:
    """x[B, T, K] -> MatMul -> Add(bias) -> Transpose([0, 2, 1]) -> BN(F) or chain([1, F, 1])
    -> Transpose([0, 2, 1]) -> y: torch code normalising a sequence's features with
    BatchNorm1d(F) on x.transpose(1, 2)."""
    t, k, f = 7, 4, 6
    b = GraphBuilder(seed=seed)
    y = b.node("MatMul", [b.input("x", ["batch", t, k]), b.weight("mm_W", [k, f], fan_in=k)],
               name="matmul")
    y = b.node("Add", [y, b.weight("mm_B", [f], fan_in=1)], name="add")
    y = b.node("Transpose", [y], name="to_bft", perm=[0, 2, 1])
    if chain:
        y = affine_chain(b, y, CHAIN_FORMS["sub_mul_add"], (1, f, 1), casts=True)
    else:
        y = b.bn(y, f, name="bn")
    b.node("Transpose", [y], name="to_btf", outputs=["y"], perm=[0, 2, 1])
    b.output("y")
    return b.build()


@pytest.mark.parametrize("chain", [False, True], ids=["bn", "chain"])
def test_normalisation_of_transposed_dense_output_folds_into_the_dense(chain):
    model = dense3d_transposed_norm(chain=chain)
    folded, report = fold_checked(model)
    assert [(d.action, d.direction, d.into) for d in report.decisions] == [
        ("folded", "backward", "matmul")]
    assert count_ops(folded) == Counter(MatMul=1, Add=1, Transpose=2)
    assert report.removed_casts == noop_casts(model)


# --- refusals -----------------------------------------------------------------------------


def chain_reason(report) -> str:
    """The reason of the one kept affine chain (and nothing folded)."""
    assert not report.folded, [d.describe() for d in report.folded]
    kept = [d for d in report.kept if d.op == "affine"]
    assert len(kept) == 1, [d.describe() for d in report.decisions]
    assert kept[0].reason
    return kept[0].reason


@pytest.mark.parametrize("form", [("Div",), ("Sub", "Div"), ("Sub", "Div", "Mul", "Add")],
                         ids=["div", "sub_div", "sub_div_mul_add"])
def test_div_by_constant_containing_zero_is_refused(form):
    rng = np.random.default_rng(7)
    constants = [chain_constant(op, (1, 6, 1, 1), rng) for op in form]
    constants[form.index("Div")][0, 4, 0, 0] = 0.0
    b = GraphBuilder(seed=7)
    y = conv_layer(b)
    affine_chain(b, y, form, (1, 6, 1, 1), out="y", constants=constants)
    b.output("y")
    model = b.build()
    folded, report = fold_checked(model)
    assert "zero" in chain_reason(report)
    assert_unchanged(model, folded, report)


WRONG_AXIS = {
    # name: (builder, reason): the constants vary along an axis the layer's channels are not on
    "matmul3d_T1": (lambda: matmul_chain(("Mul", "Add"), ("T", 1), rank=3, bias="right"),
                    "feature axis"),
    "matmul3d_1T1": (lambda: matmul_chain(CHAIN_FORMS["sub_mul_add"], (1, "T", 1), rank=3,
                                          bias=None), "feature axis"),
    "conv_H1": (lambda: conv_chain(("Mul", "Add"), (1, 1, SPATIAL[2][0], 1)), "feature axis"),
    "keras_conv_W": (lambda: keras_conv_chain(("Mul", "Add"), layout=(1, 1, SPATIAL[2][1], 1)),
                     "feature axis"),
    "relu_matmul3d_T1": (lambda: act_chain_linear(("Mul", "Add"), ("T", 1), rank=3),
                         "feature axis"),
}


@pytest.mark.parametrize("case", WRONG_AXIS)
def test_constant_varying_along_the_wrong_axis_is_refused(case):
    build, reason = WRONG_AXIS[case]
    model = build()
    folded, report = fold_checked(model)
    why = chain_reason(report)
    assert reason in why, why
    # Nothing folds, so nothing changes, not even the no-op Casts (Keras-style builders have some).
    assert report.removed_casts == 0 and not report.changed
    assert folded.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("layouts", [
    [(1, 6, SPATIAL[2][0], 1)] * 2,  # one constant varying along C and H
    [(1, 6, 1, 1), (1, 1, SPATIAL[2][0], 1)],  # Mul along C, Add along H
], ids=["one_constant", "two_constants"])
def test_constants_varying_along_two_axes_are_refused(layouts):
    b = GraphBuilder(seed=9)
    y = conv_layer(b)
    affine_chain(b, y, ("Mul", "Add"), layouts, out="y")
    b.output("y")
    model = b.build()
    folded, report = fold_checked(model)
    assert "axis" in chain_reason(report)
    assert_unchanged(model, folded, report)


def test_constant_with_more_dimensions_than_its_input_is_refused():
    """Gemm output [batch, n] times a [1, 1, n] constant is [1, batch, n]: folding it into the
    Gemm would change the output's rank."""
    model = gemm_chain(("Mul", "Add"), (1, 1, "C"))
    folded, report = fold_checked(model)
    assert chain_reason(report)
    assert_unchanged(model, folded, report)


def test_constant_divided_by_the_data_is_not_affine():
    """c / x is not an affine map of x: nothing folds."""
    b = GraphBuilder(seed=53)
    y = conv_layer(b)
    y = b.node("Div", [b.const("numerator", np.full((1, 6, 1, 1), 2.0, np.float32)), y], name="div")
    b.node("Add", [y, b.const("shift", np.ones((1, 6, 1, 1), np.float32))], name="add",
           outputs=["y"])
    b.output("y")
    model = b.build()
    folded, report = fold_checked(model)
    assert_unchanged(model, folded, report)


def test_chain_with_a_non_finite_constant_is_refused():
    rng = np.random.default_rng(71)
    scale = chain_constant("Mul", (1, 6, 1, 1), rng)
    scale[0, 1, 0, 0] = np.inf
    b = GraphBuilder(seed=71)
    y = conv_layer(b)
    affine_chain(b, y, ("Mul", "Add"), (1, 6, 1, 1), out="y",
                 constants=[scale, chain_constant("Add", (1, 6, 1, 1), rng)])
    b.output("y")
    model = b.build()
    folded, report = fold_checked(model)
    assert "not finite" in chain_reason(report)
    assert_unchanged(model, folded, report)


def test_chain_whose_folded_weights_overflow_float16_is_refused():
    """fp16 Conv with weights of 2 times a scale of 60000: 120000 > 65504."""
    b = GraphBuilder("fp16", seed=73)
    x = b.input("x", ["batch", 4, *SPATIAL[2]])
    w = b.const("conv_W", np.full((6, 4, 3, 3), 2.0, np.float16))
    y = b.node("Conv", [x, w], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    affine_chain(b, y, ("Mul", "Add"), (1, 6, 1, 1), out="y",
                 constants=[np.full((1, 6, 1, 1), 6e4), np.zeros((1, 6, 1, 1))])
    b.output("y")
    model = b.build()
    folded, report = fold_checked(model)
    assert "overflows" in chain_reason(report)
    assert_unchanged(model, folded, report)


def conv_mul_add(*, scale_source: str = "initializer", shift_source: str = "initializer",
                 casts: bool = False, seed: int = 13) -> onnx.ModelProto:
    """x -> Conv -> Mul(scale) -> Add(shift) -> y, each constant from its `source`."""
    b = GraphBuilder(seed=seed)
    y = conv_layer(b)
    if casts:
        y = noop_cast(b, y, "cast")
    scale = chain_constant("Mul", (1, 6, 1, 1), b.rng).astype(np.float32)
    y = b.node("Mul", [y, b.value("scale", scale, scale_source)], name="mul")
    shift = chain_constant("Add", (1, 6, 1, 1), b.rng).astype(np.float32)
    b.node("Add", [y, b.value("shift", shift, shift_source)], name="add", outputs=["y"])
    b.output("y")
    return b.build()


@pytest.mark.parametrize("source", ["input", "listed"])
def test_non_constant_scale_folds_nothing(source):
    """Mul by a graph input, or by an initializer also listed as graph input (IR >= 4: a caller
    may override it): the chain is not a fixed affine map; the model is left as it is."""
    model = conv_mul_add(scale_source=source)
    feeds = random_feeds(model)
    folded, report = fold_checked(model, feeds)
    assert_unchanged(model, folded, report)


def test_listed_initializer_scale_folds_when_allowed():
    model = conv_mul_add(scale_source="listed")
    folded, report = fold_checked(model, allow_initializer_inputs=True)
    assert affine_folds(report) == [("backward", "conv")]
    assert count_ops(folded) == Counter(Conv=1)


def test_non_constant_shift_stops_the_chain_after_the_constant_part():
    """Mul(constant) then Add(graph input): the Mul alone is an affine map and folds; the Add
    with the non-constant operand stays, reading the Conv."""
    model = conv_mul_add(shift_source="input")
    folded, report = fold_checked(model)
    assert affine_folds(report) == [("backward", "conv")]
    assert count_ops(folded) == Counter(Conv=1, Add=1)
    assert find_node(folded, "Add").input[0] == find_node(folded, "Conv").output[0]


def conv_chain_shared(*, shared: str, seed: int = 17) -> onnx.ModelProto:
    """x -> Conv -> c -> Sub -> s -> Mul -> m -> Add -> y, where the value `shared` ("c", "s" or
    "m") is also read by a Relu producing graph output "z"."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["batch", 4, *SPATIAL[2]])
    c = b.node("Conv", [x, b.weight("conv_W", [6, 4, 3, 3]), b.weight("conv_B", [6], fan_in=1)],
               name="conv", outputs=["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    values = {"c": c}
    for op, name, out in (("Sub", "sub", "s"), ("Mul", "mul", "m"), ("Add", "add", "y")):
        const = b.const(f"{name}_c", chain_constant(op, (1, 6, 1, 1), b.rng).astype(np.float32))
        values[out] = b.node(op, [values[list(values)[-1]], const], name=name, outputs=[out])
    b.node("Relu", [values[shared]], name="relu", outputs=["z"])
    b.output("y", "z")
    return b.build()


@pytest.mark.parametrize("shared", ["conv_output", "transpose_output"])
def test_keras_nhwc_chain_with_shared_layer_output_is_refused(shared):
    """The Conv's output or the layout Transpose's output is read by another node too."""
    model = keras_conv_chain(CHAIN_FORMS["sub_mul_add"], bias=False, casts=False)
    value = {"conv_output": "conv_out", "transpose_output": "to_nhwc_out"}[shared]
    model.graph.node.append(helper.make_node("Relu", [value], ["z"], name="relu"))
    shape = [d.dim_param or d.dim_value for d in
             next(v for v in model.graph.value_info if v.name == value).type.tensor_type.shape.dim]
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, shape))
    onnx.checker.check_model(model, full_check=True)
    folded, report = fold_checked(model)
    assert "other consumers" in chain_reason(report)
    assert_unchanged(model, folded, report)


def test_chain_whose_input_has_other_consumers_is_refused():
    model = conv_chain_shared(shared="c")
    folded, report = fold_checked(model)
    assert "other consumers" in chain_reason(report)
    assert_unchanged(model, folded, report)


@pytest.mark.parametrize("shared", ["s", "m"])
def test_chain_value_with_other_consumers_is_not_folded_past(shared):
    """An intermediate value read elsewhere must keep its value: the part of the chain after it
    stays (with "other consumers"); the part before it may fold into the Conv."""
    model = conv_chain_shared(shared=shared)
    folded, report = fold_checked(model)
    after = {"s": ("Mul", "Add"), "m": ("Add",)}[shared]
    ops = count_ops(folded)
    assert all(ops[op] == 1 for op in after), ops
    relu = find_node(folded, "Relu")
    assert relu.input[0] == shared or producer(folded, relu.input[0]).op_type == "Conv"
    if shared == "s":
        kept = [d for d in report.kept if d.op == "affine"]
        assert len(kept) == 1 and "other consumers" in kept[0].reason, [
            d.describe() for d in report.decisions]


def test_chain_output_that_is_also_a_graph_output_folds_backward_under_its_name():
    """y is a graph output and read by a Relu: the folded Conv must produce "y" itself."""
    b = GraphBuilder(seed=19)
    y = conv_layer(b)
    affine_chain(b, y, CHAIN_FORMS["sub_mul_add"], (1, 6, 1, 1), out="y", casts=True)
    b.node("Relu", ["y"], name="relu", outputs=["z"])
    b.output("y", "z")
    model = b.build()
    folded, report = fold_checked(model)
    assert_chain_folded(model, folded, report, direction="backward", into="conv",
                        expected=Counter(Conv=1, Relu=1))
    assert find_node(folded, "Conv").output[0] == "y"
    assert find_node(folded, "Relu").input[0] == "y"


def test_intermediate_chain_value_that_is_a_graph_output_keeps_its_value():
    """Conv -> Sub -> Mul -> m (graph output) -> Add -> y: m must still be computed exactly."""
    b = GraphBuilder(seed=23)
    y = conv_layer(b)
    m = affine_chain(b, y, ("Sub", "Mul"), (1, 6, 1, 1), name="head", out="m")
    affine_chain(b, m, ("Add",), (1, 6, 1, 1), name="tail", out="y")
    b.output("y", "m")
    model = b.build()
    folded, report = fold_checked(model)
    assert affine_folds(report) == [("backward", "conv")]
    assert find_node(folded, "Conv").output[0] == "m"
    assert count_ops(folded) == Counter(Conv=1, Add=1)  # the Add reads m: the Conv's own bias


def test_chain_output_that_is_a_graph_output_is_not_folded_forward():
    b = GraphBuilder(seed=29)
    x = b.node("Relu", [b.input("x", ["batch", 4])], name="act")
    x = affine_chain(b, x, CHAIN_FORMS["sub_mul_add"], (4,), out="chain_out")
    y = b.node("MatMul", [x, b.weight("mm_W", [4, 6], fan_in=4)], name="matmul")
    b.node("Add", [y, b.weight("mm_B", [6], fan_in=1)], name="add", outputs=["y"])
    b.output("y", "chain_out")
    model = b.build()
    folded, report = fold_checked(model)
    assert "graph output" in chain_reason(report)
    assert_unchanged(model, folded, report)


# --- no-op Casts --------------------------------------------------------------------------


def test_noop_casts_are_removed_except_one_producing_a_graph_output():
    b = GraphBuilder(seed=31)
    x = noop_cast(b, b.input("x", ["batch", 4, *SPATIAL[2]]), "cast_in")
    y = b.node("Conv", [x, b.weight("conv_W", [6, 4, 3, 3]), b.weight("conv_B", [6], fan_in=1)],
               name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = affine_chain(b, y, CHAIN_FORMS["sub_mul_add"], (1, 6, 1, 1), casts=True)
    y = noop_cast(b, b.node("Relu", [y], name="relu"), "cast_mid")
    b.node("Cast", [y], name="cast_out", outputs=["y"], to=TensorProto.FLOAT)
    b.output("y")
    model = b.build()
    assert noop_casts(model) == 6
    folded, report = fold_checked(model)
    assert affine_folds(report) == [("backward", "conv")]
    assert report.removed_casts == 5
    assert count_ops(folded) == Counter(Conv=1, Relu=1, Cast=1)
    assert producer(folded, "y").op_type == "Cast"


def test_real_cast_to_float16_is_kept():
    b = GraphBuilder(seed=37)
    y = conv_layer(b)
    y = affine_chain(b, y, CHAIN_FORMS["sub_mul_add"], (1, 6, 1, 1), casts=True)
    y = b.node("Cast", [noop_cast(b, y, "cast_noop")], name="to_half", to=TensorProto.FLOAT16)
    b.node("Relu", [y], name="relu", outputs=["y"])
    b.output("y")
    model = b.build()
    folded, report = fold_checked(model)
    assert affine_folds(report) == [("backward", "conv")]
    assert report.removed_casts == noop_casts(model) == 4
    assert count_ops(folded) == Counter(Conv=1, Cast=1, Relu=1)
    cast = find_node(folded, "Cast")
    assert helper.get_node_attr_value(cast, "to") == TensorProto.FLOAT16


def test_real_cast_between_layer_and_chain_blocks_the_backward_fold():
    """Conv -> Cast(float16) -> chain (float16 constants): folding into the float32 Conv would
    move the chain before a rounding; the chain stays, the Cast stays."""
    b = GraphBuilder(seed=41)
    y = conv_layer(b)
    y = b.node("Cast", [y], name="to_half", to=TensorProto.FLOAT16)
    b.dtype = "fp16"
    affine_chain(b, y, CHAIN_FORMS["sub_mul_add"], (1, 6, 1, 1), out="y")
    b.output("y")
    model = b.build()
    folded, report = fold_checked(model)
    assert not report.folded
    assert count_ops(folded) == count_ops(model)


# --- BatchNormalization nodes: standalone lowering, Identity parameters -------------------


def test_lower_standalone_bn_becomes_one_mul_and_one_add():
    model = act_bn_tail(act="Relu", tail="Softmax")
    folded, report = fold_checked(model, lower_standalone=True)
    assert [(d.node, d.action, d.op) for d in report.decisions] == [("bn", "lowered", BN)]
    assert count_ops(folded) == Counter(Relu=1, Mul=1, Add=1, Softmax=1)
    mul, add = find_node(folded, "Mul"), find_node(folded, "Add")
    assert mul.input[0] == find_node(folded, "Relu").output[0]
    assert mul.output[0] in add.input
    assert find_node(folded, "Softmax").input[0] == add.output[0]


def test_lower_standalone_bn_on_images_uses_per_channel_constants():
    b = GraphBuilder(seed=59)
    x = b.node("Relu", [b.input("x", ["batch", 4, *SPATIAL[2]])], name="act")
    y = b.bn(x, 4, name="bn")
    b.node("Sigmoid", [y], name="tail", outputs=["y"])
    b.output("y")
    model = b.build()
    folded, report = fold_checked(model, lower_standalone=True)
    assert [(d.node, d.action) for d in report.decisions] == [("bn", "lowered")]
    assert count_ops(folded) == Counter(Relu=1, Mul=1, Add=1, Sigmoid=1)


def test_lower_standalone_does_not_lower_a_training_mode_bn():
    model = conv_bn(opset=15, training_mode=1, n_outputs=3)
    folded, report = fold_checked(model, lower_standalone=True)
    assert "training mode" in kept_reason(report)
    assert count_ops(folded) == count_ops(model)


def test_standalone_bn_is_kept_by_default():
    model = act_bn_tail(act="Relu", tail="Softmax")
    folded, report = fold_checked(model)
    assert kept_reason(report)
    assert count_ops(folded) == count_ops(model)


@pytest.mark.parametrize("direct", [True, False], ids=["shared_with_direct_reader", "identity_only"])
def test_bn_parameters_behind_identity_nodes_fold_and_are_cleaned_up(direct):
    """TorchScript writes an equal tensor once and the other uses as Identity(initializer): two
    Conv -> BN branches whose BNs share equal parameters that way (`direct`: BN "bn_a" reads the
    initializers, "bn_b" the Identity outputs), or one BN that reads only Identity outputs."""
    b = GraphBuilder(seed=43)
    x = b.input("x", ["batch", 4, *SPATIAL[2]])
    params = trained_bn_params(6, b.rng)
    keys = ("scale", "bias", "mean", "var")
    for key in keys:
        b.const(f"bn_{key}", params[key].astype(np.float32))
    branches = ("a", "b") if direct else ("b",)
    for branch in branches:
        y = b.node("Conv", [x, b.weight(f"conv_{branch}_W", [6, 4, 3, 3]),
                            b.weight(f"conv_{branch}_B", [6], fan_in=1)],
                   name=f"conv_{branch}", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        if branch == "a":
            names = [f"bn_{key}" for key in keys]
        else:
            names = [b.node("Identity", [f"bn_{key}"], name=f"share_{key}") for key in keys]
        b.nodes.append(helper.make_node(BN, [y, *names], [f"y_{branch}"], name=f"bn_{branch}"))
    b.output(*[f"y_{branch}" for branch in branches])
    model = b.build()
    folded, report = fold_checked(model)
    assert sorted((d.node, d.action) for d in report.decisions) == [
        (f"bn_{branch}", "folded") for branch in branches]
    assert count_ops(folded) == Counter(Conv=len(branches))
    left = {t.name for t in folded.graph.initializer} & {f"bn_{key}" for key in keys}
    assert not left, f"unused BN parameters left: {sorted(left)}"


def test_chain_inside_an_if_branch_folds_with_outer_scope_constants():
    """If(cond): then = Conv -> Cast -> Sub -> Mul -> Add on x and constants of the main graph;
    else = Identity(x)."""
    b = GraphBuilder(seed=61)
    x = b.input("x", ["batch", 4, *SPATIAL[2]])
    cond = b.input("cond", [], TensorProto.BOOL)
    w, bias = b.weight("then_W", [4, 4, 3, 3]), b.weight("then_B", [4], fan_in=1)
    body = GraphBuilder(seed=62, name="then_body")
    y = body.node("Conv", [x, w, bias], name="then_conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = noop_cast(body, y, "then_cast")
    names = []
    for i, op in enumerate(("Sub", "Mul", "Add")):
        names.append(b.const(f"then_c{i}", chain_constant(op, (1, 4, 1, 1), b.rng)
                             .astype(np.float32)))
    y = body.node("Sub", [y, names[0]], name="then_sub")
    y = body.node("Mul", [y, names[1]], name="then_mul")
    body.node("Add", [y, names[2]], name="then_add", outputs=["then_out"])
    info = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                      ["batch", 4, *SPATIAL[2]])
    other = GraphBuilder(seed=63, name="else_body")
    other.node("Identity", [x], name="else_id", outputs=["else_out"])
    b.node("If", [cond], name="if", outputs=["y"], then_branch=body.subgraph([info("then_out")]),
           else_branch=other.subgraph([info("else_out")]))
    b.output("y")
    model = b.build()
    feeds = [{**random_feeds(model), "cond": np.array(flag)} for flag in (True, False)]
    folded, report = fold_checked(model, feeds)
    assert [(d.action, d.direction, d.into) for d in report.decisions if d.op == "affine"] == [
        ("folded", "backward", "then_conv")]
    assert report.removed_casts == 1
    assert count_ops(folded) == Counter(If=1, Conv=1, Identity=1)
