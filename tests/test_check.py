"""The check's criterion and its float64 reference (bnfold/verify/criterion.py, reference.py).

The reference must compute what the original computes, only more precisely: each rewrite of an
operator without a float64 kernel is compared with onnxruntime's float32 operator. The criterion
must pass every correct fold, also of layers with extreme statistics, and fail wrong ones.
"""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.verify import random_inputs, run, verify
from bnfold.verify.criterion import Unavailable
from bnfold.verify.perturb import perturbed
from bnfold.verify.reference import widen
from bnfold.verify.runtime import run_session, session

verify_module = importlib.import_module("bnfold.verify")
F, D = TensorProto.FLOAT, TensorProto.DOUBLE


def _model(nodes, inputs, outputs, inits=None, opset=17, elem=F):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, elem, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, elem, s) for n, s in outputs],
        [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if all(s is not None for _, s in (*inputs, *outputs)):  # the checker wants output shapes
        onnx.checker.check_model(model)
    return model


def _float64_outputs(model, feeds):
    ref = widen(model, None)
    wide = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    return run_session(session(ref.model, None, "reference", initializers=ref.arrays), wide), ref


# --- the reference: rewrites agree with onnxruntime's float32 operators -------------------------

CONVS = [
    dict(rank=2, group=1, strides=1, dilations=1, pads=(1, 1, 1, 1), bias=True, k=3),
    dict(rank=2, group=2, strides=2, dilations=1, pads=(0, 1, 2, 0), bias=False, k=3),
    dict(rank=2, group=6, strides=1, dilations=2, pads=(2, 2, 2, 2), bias=True, k=3),  # depthwise
    dict(rank=2, group=1, strides=2, dilations=1, pads=(0, 0, 0, 0), bias=True, k=1),
    dict(rank=2, group=1, strides=1, dilations=1, pads=None, bias=True, k=2, auto_pad="VALID"),
    dict(rank=1, group=3, strides=2, dilations=1, pads=(1, 2), bias=True, k=3),
    dict(rank=3, group=1, strides=1, dilations=1, pads=(1, 0, 1, 1, 0, 1), bias=True, k=2),
]


@pytest.mark.parametrize("conv", CONVS)
def test_conv_rewrite_matches_onnxruntime(conv):
    rank, group, k = conv["rank"], conv["group"], conv["k"]
    rng = np.random.default_rng(rank * 10 + group)
    c_in, c_out, size = 6, 12, [7, 6, 5][:rank]
    attrs = dict(group=group, strides=[conv["strides"]] * rank,
                 dilations=[conv["dilations"]] * rank)
    if conv.get("auto_pad"):
        attrs["auto_pad"] = conv["auto_pad"]
    else:
        attrs["pads"] = list(conv["pads"])
    inits = {"w": rng.standard_normal((c_out, c_in // group, *[k] * rank)).astype(np.float32)}
    if conv["bias"]:
        inits["b"] = rng.standard_normal(c_out).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", *(["b"] if conv["bias"] else [])], ["y"], **attrs)
    model = _model([node], [("x", ["n", c_in, *size])], [("y", None)], inits)
    x = rng.standard_normal((2, c_in, *size)).astype(np.float32)
    expected = run(model, {"x": x})["y"]
    wide, ref = _float64_outputs(model, {"x": x})
    assert wide["y"].dtype == np.float64 and wide["y"].shape == expected.shape
    np.testing.assert_allclose(wide["y"], expected, rtol=1e-5, atol=1e-5)
    assert ref.rewritten == {"Conv": 1} and not ref.islands


@pytest.mark.parametrize("op, attrs", [("GlobalAveragePool", {}), ("HardSigmoid", {"alpha": 0.3}),
                                       ("HardSwish", {}), ("Erf", {})])
def test_operators_without_a_double_kernel(op, attrs):
    model = _model([helper.make_node(op, ["x"], ["y"], **attrs)], [("x", [2, 3, 4, 5])],
                   [("y", None)])
    x = {"x": 3 * np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)}
    wide, ref = _float64_outputs(model, x)
    np.testing.assert_allclose(wide["y"], run(model, x)["y"], rtol=1e-6, atol=1e-6)
    if op == "Erf":  # no rewrite: run in float32 between Casts, and said so
        assert ref.islands == {"Erf": 1} and "Erf" in ref.describe()
    else:
        assert ref.rewritten == {op: 1} and not ref.islands


def test_widening_casts_constants_and_fixed_float_inputs():
    # Cast to float, a Constant value_float, ConstantOfShape's value, and Resize, whose scales
    # input must stay float32: all become or stay what onnxruntime's float64 kernels accept.
    nodes = [
        helper.make_node("Cast", ["i"], ["f"], to=F),
        helper.make_node("Constant", [], ["c"], value_float=0.1),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("ConstantOfShape", ["s"], ["z"],
                         value=numpy_helper.from_array(np.array([0.25], np.float32))),
        helper.make_node("Add", ["x", "c"], ["a"]),
        helper.make_node("Add", ["a", "z"], ["a2"]),
        helper.make_node("Resize", ["a2", "", "scales"], ["r"], mode="nearest"),
        helper.make_node("Add", ["r", "f"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", F, [1, 1, 2, 2]),
                     helper.make_tensor_value_info("i", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", F, None)],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2), "i": np.array([3])}
    wide, _ = _float64_outputs(model, feeds)
    assert wide["y"].dtype == np.float64
    np.testing.assert_allclose(wide["y"], run(model, feeds)["y"], rtol=1e-6)


def test_widening_widens_sparse_initializers_and_sparse_constants():
    # float32 sparse values beside float64 tensors would leave no float64 reference at all
    values = numpy_helper.from_array(np.array([0.5, -1.25, 3.0], np.float32), "S")
    indices = numpy_helper.from_array(np.array([0, 2, 3]), "S_indices")
    constant = helper.make_sparse_tensor(numpy_helper.from_array(np.array([2.0], np.float32), "c"),
                                         numpy_helper.from_array(np.array([1])), [4])
    nodes = [helper.make_node("Add", ["x", "S"], ["a"]),
             helper.make_node("Constant", [], ["k"], sparse_value=constant),
             helper.make_node("Mul", ["a", "k"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 4])],
                              [helper.make_tensor_value_info("y", F, [2, 4])],
                              sparse_initializer=[helper.make_sparse_tensor(values, indices, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    feeds = {"x": np.arange(8, dtype=np.float32).reshape(2, 4) / 3}
    wide, _ = _float64_outputs(model, feeds)
    assert wide["y"].dtype == np.float64
    expected = (feeds["x"].astype(np.float64) + [0.5, 0, -1.25, 3.0]) * [0, 2, 0, 0]
    np.testing.assert_array_equal(wide["y"], expected)


# --- the criterion ------------------------------------------------------------------------------

def _bn_params(rng, c, mean_scale, var_range, prefix):
    return {f"{prefix}gamma": rng.uniform(0.5, 2, c).astype(np.float32),
            f"{prefix}beta": rng.standard_normal(c).astype(np.float32),
            f"{prefix}mean": (mean_scale * rng.standard_normal(c)).astype(np.float32),
            f"{prefix}var": np.exp(rng.uniform(*np.log(var_range), c)).astype(np.float32)}


def _stack(rng, layer="conv", *, depth=1, c=4, group=1, mean_scale=1.0, var_range=(0.5, 2.0)):
    """``depth`` x (Conv(3x3, pads 1) on [n, c, 5, 5], or Gemm on [n, c]) -> BN, with ReLU
    between them; statistics as asked."""
    params, nodes, x = {}, [], "x"
    for i in range(depth):
        if layer == "gemm":
            params[f"w{i}"] = rng.standard_normal((c, c)).astype(np.float32)
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"h{i}"]))
        else:
            params[f"w{i}"] = rng.standard_normal((c, c // group, 3, 3)).astype(np.float32)
            nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"h{i}"],
                                          pads=[1] * 4, group=group))
        params[f"b{i}"] = rng.standard_normal(c).astype(np.float32)
        bn = _bn_params(rng, c, mean_scale, var_range, f"bn{i}.")
        params |= bn
        out = "y" if i == depth - 1 else f"n{i}"
        nodes.append(helper.make_node("BatchNormalization", [f"h{i}", *bn], [out]))
        if i < depth - 1:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            x = f"r{i}"
    shape = ["n", c] if layer == "gemm" else ["n", c, 5, 5]
    return _model(nodes, [("x", shape)], [("y", shape)], params)


def _conv_bn(rng, **kwargs):
    return _stack(rng, "conv", **kwargs)


def _folded_weight(folded: onnx.ModelProto, index: int = -1) -> onnx.TensorProto:
    layer = [n for n in folded.graph.node if n.op_type in ("Conv", "Gemm")][index]
    return next(t for t in folded.graph.initializer if t.name == layer.input[1])


def _with_weight(folded, value, index: int = -1):
    wrong = onnx.ModelProto()
    wrong.CopyFrom(folded)
    name = _folded_weight(folded, index).name
    for t in wrong.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return wrong


big_statistics = st.fixed_dictionaries(dict(
    seed=st.integers(0, 2**31 - 1),
    mean_scale=st.sampled_from([1.0, 1e2, 1e4]),
    var_range=st.sampled_from([(0.5, 2.0), (1e-4, 1e-2), (1e2, 1e5), (1e-4, 1e4)]),
))


def _resolution(values: np.ndarray, ulps: int = 64) -> float:
    """``ulps`` float32 ulps at the largest |value|: below that, a change is rounding-sized."""
    return ulps * float(np.spacing(np.float32(np.abs(values).max())))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stats=big_statistics, layer=st.sampled_from(["conv", "depthwise", "gemm"]),
       depth=st.integers(1, 4), data=st.data())
def test_correct_folds_pass_and_wrong_ones_fail(stats, layer, depth, data):
    rng = np.random.default_rng(stats["seed"])
    model = _stack(rng, "gemm" if layer == "gemm" else "conv", depth=depth,
                   group=4 if layer == "depthwise" else 1, mean_scale=stats["mean_scale"],
                   var_range=stats["var_range"])
    folded, report = bnfold.fold(model)
    assert len(report.folded) == depth
    check = verify(model, folded)  # the default draws
    assert check.passed, check.to_text()
    # Wrong candidates fail whenever what they change is well above rounding: 64 ulps of the
    # output (of the channel, for a wrong channel), plus 16 times what the correct fold itself
    # moved. Smaller changes cannot be told from rounding.
    feeds = random_inputs(model, dims={"n": 3}, seed=1)
    y = run(folded, feeds)["y"].astype(np.float64)
    moved = 16 * np.abs(run(model, feeds)["y"] - y)
    index = data.draw(st.integers(0, depth - 1), label="wrong layer")
    w = numpy_helper.to_array(_folded_weight(folded, index)).astype(np.float64)
    wrong = _with_weight(folded, w * (1 + 1e-3), index)  # one weight tensor 1e-3 off, relative
    change = np.abs(run(wrong, feeds)["y"] - y).max()
    if change > _resolution(y) + moved.max():
        assert not verify(model, wrong, inputs=feeds).passed, (change, _resolution(y))
    if layer != "gemm":  # feature maps: each channel is judged on its own
        channel = int(rng.integers(w.shape[0]))
        w[channel] *= 1 + 1e-3
        wrong = _with_weight(folded, w, index)
        change = np.abs(run(wrong, feeds)["y"] - y)
        channel_change = change[:, channel].max()
        if change.max() > _resolution(y) + moved.max() or (
                index == depth - 1
                and channel_change > _resolution(y[:, channel]) + moved[:, channel].max()):
            assert not verify(model, wrong, inputs=feeds).passed


def test_a_small_channel_is_judged_on_its_own():
    model = _conv_bn(np.random.default_rng(5))
    for t in model.graph.initializer:  # channel 0 about 1e-4 as large as the others
        if t.name in ("bn0.gamma", "bn0.beta"):
            v = numpy_helper.to_array(t).copy()
            v[0] *= 1e-4
            t.CopyFrom(numpy_helper.from_array(v, t.name))
    folded, _ = bnfold.fold(model)
    assert verify(model, folded).passed
    w = numpy_helper.to_array(_folded_weight(folded)).astype(np.float64)
    w[0] *= 1 + 1e-3  # far below the other channels' rounding, far above channel 0's
    [out] = verify(model, _with_weight(folded, w)).outputs
    assert not out.passed and out.worst.endswith("channel 0 (axis 1)"), out.describe()
    assert "channel 0 (axis 1) FAILED" in out.describe()


def test_bit_close_candidates_need_no_reference(monkeypatch):
    def no_reference(*args):
        raise AssertionError("the float64 reference was built")

    monkeypatch.setattr(verify_module, "float64_runs", no_reference)
    model = _conv_bn(np.random.default_rng(0))
    report = verify(model, model)
    assert report.passed and report.reference.startswith("not needed")
    [out] = report.outputs
    assert out.criterion == "close" and out.max_abs == 0 and out.bound > 0
    assert "reference: not needed" in report.to_text()


def _deep_chain(depth=6, offset=100.0, seed=0):
    """x + offset -> (MatMul -> Mul(gain) -> Add(shift cancelling the offset) -> + offset) x depth:
    a BN-like cancellation at every layer, so float32 rounding grows well past 8 ulps."""
    rng = np.random.default_rng(seed)
    inits = {"off": np.full(16, offset, np.float32)}
    nodes, x = [helper.make_node("Add", ["x", "off"], ["x0"])], "x0"
    for i in range(depth):
        w = (rng.standard_normal((16, 16)) / 4).astype(np.float32)
        g = rng.uniform(0.5, 3, 16).astype(np.float32)
        inits |= {f"w{i}": w, f"g{i}": g, f"t{i}": (-offset * w.sum(0) * g).astype(np.float32)}
        out = "y" if i == depth - 1 else f"a{i}"
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Mul", [f"m{i}", f"g{i}"], [f"s{i}"]),
                  helper.make_node("Add", [f"s{i}", f"t{i}"], [out])]
        if i < depth - 1:
            nodes.append(helper.make_node("Add", [out, "off"], [f"x{i + 1}"]))
            x = f"x{i + 1}"
    return _model(nodes, [("x", ["n", 16])], [("y", ["n", 16])], inits)


def _merged_chain(model, wrong_layer: int | None = None):
    """The chain with each Mul merged into its MatMul (W * g, rounded to float32): a correct
    fold; ``wrong_layer``'s merged weight 1e-3 off."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes, kept = [], {}
    for n in model.graph.node:
        if n.op_type == "MatMul":
            i = int(n.input[1][1:])
            v = inits[f"w{i}"].astype(np.float64) * inits[f"g{i}"]
            kept[f"v{i}"] = (v * (1 + 1e-3 if i == wrong_layer else 1)).astype(np.float32)
            nodes.append(helper.make_node("MatMul", [n.input[0], f"v{i}"], [f"s{i}"]))
        elif n.op_type != "Mul":
            kept |= {k: inits[k] for k in n.input if k in inits}
            nodes.append(n)
    return _model(nodes, [("x", ["n", 16])], [("y", ["n", 16])], kept)


def test_rounding_past_the_old_tolerance_passes_against_the_float64_reference():
    model = _deep_chain()
    merged = _merged_chain(model)
    report = verify(model, merged)
    [out] = report.outputs
    assert report.passed and out.criterion == "accuracy" and report.reference.startswith(
        "the original in float64")
    assert out.e_cand <= out.bound and out.e_orig > 0
    # Not bit-close, and the old test (now only with tolerances given) refuses it.
    assert out.max_abs > 8 * np.spacing(np.float32(np.abs(run(model, random_inputs(model))["y"]).max()))
    assert not verify(model, merged, atol=0.0, rtol=1e-6).passed
    for layer in (0, 3, 5):
        assert not verify(model, _merged_chain(model, wrong_layer=layer)).passed


def test_without_a_reference_tolerances_scale_to_the_originals_rounding(monkeypatch):
    def unavailable(*args):
        raise Unavailable("no float64 kernels today")

    monkeypatch.setattr(verify_module, "float64_runs", unavailable)
    model = _deep_chain()
    report = verify(model, _merged_chain(model))
    [out] = report.outputs
    assert report.passed and out.criterion == "scaled tolerance"
    assert report.reference.startswith("unavailable (no float64 kernels today)")
    assert out.e_orig > 0 and out.atol >= 4 * out.e_orig
    for layer in (0, 3, 5):
        assert not verify(model, _merged_chain(model, wrong_layer=layer)).passed


def test_float64_models_have_no_wider_reference():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 16))
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", ["n", 16])],
                   [("y", ["n", 16])], {"w": w}, elem=D)
    shifted = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", ["n", 16])],
                     [("y", ["n", 16])], {"w": w * (1 + 1e-14)}, elem=D)
    report = verify(model, shifted)
    assert report.passed and "no float tensor narrower than float64" in report.reference
    assert report.outputs[0].criterion == "scaled tolerance"
    wrong = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", ["n", 16])],
                   [("y", ["n", 16])], {"w": w * (1 + 1e-6)}, elem=D)
    assert not verify(model, wrong).passed


def test_integer_outputs_are_exact_and_user_tolerances_keep_their_meaning():
    model = _model([helper.make_node("Add", ["x", "one"], ["y"])], [("x", ["n"])], [("y", ["n"])],
                   {"one": np.array(1, np.int64)}, elem=TensorProto.INT64)
    [out] = verify(model, model).outputs
    assert out.criterion == "exact" and out.atol == 0 and out.passed
    m = _stack(np.random.default_rng(1), "gemm")
    folded, _ = bnfold.fold(m)
    [out] = verify(m, folded, atol=0.5, rtol=0.0).outputs
    assert out.criterion == "tolerance" and (out.atol, out.rtol) == (0.5, 0.0)
    assert "(atol 0.5, rtol 0)" in out.describe()


def test_report_json_keeps_old_keys_and_adds_the_criterions():
    model = _deep_chain()
    report = verify(model, _merged_chain(model)).to_dict()
    assert report["reference"].startswith("the original in float64")
    [out] = report["outputs"]
    assert {"name", "dtype", "shape", "max_abs", "max_rel", "atol", "rtol", "passed",
            "needed_atol", "needed_rtol", "note"} <= out.keys()
    assert out["criterion"] == "accuracy"
    assert {"e_orig", "e_cand", "allowance", "bound"} <= out.keys()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_perturbed_moves_every_element_by_one_ulp(dtype):
    values = np.array([1.0, -3.5, 1e-3, 0.0, 100.0], dtype)
    moved = perturbed(values, np.random.default_rng(0))
    assert moved.dtype == values.dtype
    steps = np.abs(moved.astype(np.float64) - values.astype(np.float64))
    nonzero = values != 0
    np.testing.assert_array_equal(steps[nonzero], np.spacing(np.abs(values[nonzero]))
                                  .astype(np.float64) * np.where(
                                      np.abs(moved[nonzero]) < np.abs(values[nonzero]), 1, 1))
    assert steps[~nonzero][0] > 0


# --- memory: what the check holds ------------------------------------------------------------

def test_large_weights_go_to_the_reference_in_their_own_type_and_are_widened_in_the_graph():
    # Regression: every large weight was handed to onnxruntime in float64, which onnxruntime
    # copies: the reference of a 1.07 GB float32 MLP held 4.3 GB of weights.
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [2, 64])],
                   [("y", [2, 32])], {"w": w})
    feeds = {"x": rng.standard_normal((2, 64)).astype(np.float32)}
    outputs, ref = _float64_outputs(model, feeds)
    [array] = ref.arrays.values()
    assert array.dtype == np.float32 and np.array_equal(array, w)
    [cast] = [n for n in ref.model.graph.node if n.op_type == "Cast"]
    assert cast.output[0] == "w" and helper.get_attribute_value(cast.attribute[0]) == D
    exact = feeds["x"].astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(outputs["y"], exact, rtol=1e-13, atol=1e-13)


def test_an_initializer_a_caller_may_override_is_widened_in_place_not_cast():
    w = np.ones((64, 32), np.float32)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [2, 64])],
                   [("y", [2, 32])], {"w": w})
    model.graph.input.append(helper.make_tensor_value_info("w", F, [64, 32]))
    ref = widen(model, None)
    assert [a.dtype for a in ref.arrays.values()] == [np.float64]
    assert not [n for n in ref.model.graph.node if n.op_type == "Cast"]


def test_the_interface_does_not_keep_the_model_alive():
    # Regression: each input's Value held its TypeProto, a sub-message of the model, which kept
    # the whole model (weights included) in memory for the whole check.
    from bnfold.verify.inputs import interface
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [("x", [2, 3])], [("y", [2, 3])])
    [x] = interface(model).inputs
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    assert x.proto.tensor_type.elem_type == F  # a copy, not a view into the model
