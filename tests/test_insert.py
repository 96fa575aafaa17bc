"""`bnfold insert`: selection, placement, numerics against numpy (inference and training mode),
presets, --identity, naming, old IRs and opsets, the CLI, real torch/Keras exports, round trip.

Numerical references are numpy batch norms over the feature axis (the last axis of a Dense
output, as Keras's axis=-1), computed in float64 from the parameters as stored. Batch 3 and
sequence 5 differ from every feature count (6, 4, 2), so an axis mix-up changes the numbers.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from builders import GraphBuilder, count_ops, run_unoptimised, tensor_value
from bnfold.cli.insert import insert_command
from bnfold.errors import BadInput
from bnfold.fold import fold
from bnfold.insert import PRESETS, _identity_var, insert

BN = "BatchNormalization"
BATCH, SEQ = 3, 5
F_IN, F_HID, F_OUT = 6, 4, 2
ATOL, RTOL = 1e-5, 1e-4
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
ACT = {"Relu": lambda v: np.maximum(v, 0.0), "Tanh": np.tanh}


# --------------------------------------------------------------------------- models and numpy


def mlp(*, kinds=("gemm", "gemm"), rank: int = 2, act: str | None = "Relu",
        final_act: str | None = None, opset: int = 17, ir_version: int | None = None,
        dtype: str = "fp32", bias_side: str = "right", seed: int = 0) -> onnx.ModelProto:
    """x[batch, (seq,) 6] -> dense_1 (6->4) -> act -> dense_2 (4->2) [-> final_act] -> y.

    A "gemm" layer is Gemm(x, W[n, k], b, transB=1) (rank 2 only), a "matmul" layer is
    MatMul(x, W[k, n]) then Add with the bias on `bias_side`, named "<layer>" and "<layer>/add".
    """
    b = GraphBuilder(dtype, opset=opset, ir_version=ir_version, seed=seed)
    h = b.input("x", ["batch", F_IN] if rank == 2 else ["batch", "seq", F_IN])
    sizes = [(F_IN, F_HID), (F_HID, F_OUT)]
    for i, (kind, (k, n)) in enumerate(zip(kinds, sizes), start=1):
        name = f"dense_{i}"
        last = i == len(kinds) and final_act is None
        outputs = ["y"] if last else None
        if kind == "gemm":
            h = b.node("Gemm", [h, b.weight(f"{name}.W", [n, k], fan_in=k),
                                b.weight(f"{name}.b", [n], fan_in=1)],
                       name=name, transB=1, outputs=outputs)
        else:
            h = b.node("MatMul", [h, b.weight(f"{name}.W", [k, n], fan_in=k)], name=name)
            bias = b.weight(f"{name}.b", [n], fan_in=1)
            h = b.node("Add", [h, bias] if bias_side == "right" else [bias, h],
                       name=f"{name}/add", outputs=outputs)
        if i == 1 and act:
            h = b.node(act, [h], name="act_1")
    if final_act:
        b.node(final_act, [h], name="act_2", outputs=["y"])
    b.output("y")
    return b.build()


def forward(model: onnx.ModelProto, x: np.ndarray, *, act="Relu", final_act=None, bn=None):
    """float64 numpy forward pass of an `mlp` model; `bn(stage, value)` may replace the value at
    "dense_1", "act_1", "dense_2" or "act_2"."""
    bn = bn or (lambda stage, v: v)
    h = x.astype(np.float64)
    for i in (1, 2):
        w = tensor_value(model, f"dense_{i}.W").astype(np.float64)
        b = tensor_value(model, f"dense_{i}.b").astype(np.float64)
        gemm = any(n.name == f"dense_{i}" and n.op_type == "Gemm" for n in model.graph.node)
        h = bn(f"dense_{i}", h @ (w.T if gemm else w) + b)  # Gemm's weight is [n, k] (transB)
        activation = act if i == 1 else final_act
        if activation:
            h = bn(f"act_{i}", ACT[activation](h))
    return h


def bn_inference(x, p, eps):
    """Batch norm over the last axis with running statistics."""
    return (x - p["mean"]) / np.sqrt(p["var"] + eps) * p["gamma"] + p["beta"]


def bn_training(x, p, eps, momentum):
    """Batch norm over the last axis with batch statistics (population variance), and the
    updated running statistics: running * momentum + batch * (1 - momentum)."""
    axes = tuple(range(x.ndim - 1))
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    y = (x - mean) / np.sqrt(var + eps) * p["gamma"] + p["beta"]
    running_mean = p["mean"] * momentum + mean * (1 - momentum)
    return y, running_mean, p["var"] * momentum + var * (1 - momentum)


def train_params(model: onnx.ModelProto, insertion, seed: int = 1, var=(0.3, 3.0)) -> dict:
    """Give an inserted BN trained-looking parameters (in place); their float64 values as stored."""
    rng = np.random.default_rng(seed)
    n = insertion.features
    values = {"gamma": rng.uniform(0.5, 2.0, n) * np.where(rng.random(n) < 0.3, -1, 1),
              "beta": rng.normal(0, 1, n), "mean": rng.normal(0, 1, n),
              "var": rng.uniform(*var, n)}
    stored = {}
    for t in model.graph.initializer:
        for key, name in insertion.params.items():
            if t.name == name:
                array = values[key].astype(numpy_helper.to_array(t).dtype)
                t.CopyFrom(numpy_helper.from_array(array, name))
                stored[key] = array.astype(np.float64)
    assert set(stored) == {"gamma", "beta", "mean", "var"}
    return stored


def feeds_for(rank: int, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    shape = (BATCH, F_IN) if rank == 2 else (BATCH, SEQ, F_IN)
    return {"x": np.random.default_rng(seed).normal(0.5, 1.5, shape).astype(dtype)}


def assert_close(actual, expected, what: str, atol=ATOL, rtol=RTOL) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected)
    assert np.all(err <= atol + rtol * np.abs(expected)), f"{what}: max abs error {err.max():.3g}"


def checked(model: onnx.ModelProto) -> onnx.ModelProto:
    """What every insert result must pass: the full checker and strict shape inference."""
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def producer_op(model: onnx.ModelProto, value: str) -> str:
    return next(n.op_type for n in model.graph.node if value in n.output)


def attrs(n: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


# --------------------------------------------------------------------------- selection


def test_select_by_exact_name():
    out, report = insert(mlp(), after=["dense_2"])
    assert [i.layer for i in report.insertions] == ["dense_2"]
    assert count_ops(checked(out))[BN] == 1
    assert node(out, "dense_2/BatchNormalization").op_type == BN


def test_select_by_glob_takes_every_match_in_graph_order():
    out, report = insert(mlp(), after=["dense_*"])
    assert [i.layer for i in report.insertions] == ["dense_1", "dense_2"]
    assert count_ops(checked(out))[BN] == 2


def test_select_by_op_alone_takes_all_layers_of_that_op():
    model = mlp(kinds=("gemm", "matmul"))
    _, by_matmul = insert(model, ops=["MatMul"])
    _, by_gemm = insert(model, ops=["Gemm"])
    assert [i.layer for i in by_matmul.insertions] == ["dense_2"]
    assert [i.layer for i in by_gemm.insertions] == ["dense_1"]


def test_op_restricts_names_and_all():
    model = mlp(kinds=("gemm", "matmul"))
    _, report = insert(model, ops=["MatMul"], all_layers=True)
    assert [i.layer for i in report.insertions] == ["dense_2"]
    with pytest.raises(BadInput, match="no layer matches 'dense_1'; layers: dense_2"):
        insert(model, ops=["MatMul"], after=["dense_1"])


def test_select_all():
    out, report = insert(mlp(kinds=("matmul", "gemm")), all_layers=True)
    assert [i.layer for i in report.insertions] == ["dense_1", "dense_2"]
    assert count_ops(checked(out))[BN] == 2


@pytest.mark.parametrize("options, message", [
    ({"after": ["dense_9"]}, "no layer matches 'dense_9'; layers: dense_1, dense_2"),
    ({"after": ["dense_1", "conv*"]}, r"no layer matches 'conv\*'; layers: dense_1, dense_2"),
    ({}, "no layer selected .*; layers: dense_1, dense_2"),
    ({"ops": ["Conv"]}, "no Conv layer in the model; layers: dense_1, dense_2"),
    ({"ops": ["Softmax"]}, "unknown layer op Softmax"),
])
def test_selection_matching_nothing_lists_the_candidates(options, message):
    with pytest.raises(BadInput, match=message):
        insert(mlp(), **options)


def test_conv_layers_only_when_asked_for():
    b = GraphBuilder(seed=3)
    x = b.input("x", ["batch", 4, 9, 7])
    y = b.node("Conv", [x, b.weight("conv.W", [6, 2, 3, 3], fan_in=18)], name="conv",
               kernel_shape=[3, 3], group=2)
    b.node("Relu", [y], name="relu", outputs=["y"])
    b.output("y")
    model = b.build()
    with pytest.raises(BadInput, match="no Dense"):
        insert(model, all_layers=True)
    out, report = insert(model, ops=["Conv"], after=["conv"])
    (ins,) = report.insertions
    assert (ins.features, ins.transpose, ins.follows) == (6, None, "Relu")
    p = train_params(out, ins)
    x_val = np.random.default_rng(0).normal(size=(BATCH, 4, 9, 7)).astype(np.float32)
    conv_relu = run_unoptimised(model, {"x": x_val})["y"].astype(np.float64)
    expected = bn_inference(np.moveaxis(conv_relu, 1, -1), p, PRESETS["keras"][0])
    assert_close(run_unoptimised(checked(out), {"x": x_val})["y"], np.moveaxis(expected, -1, 1),
                 "Conv -> Relu -> BN(axis 1)")


# --------------------------------------------------------------------------- placement, numerics


@pytest.mark.parametrize("kinds, rank", [(("gemm", "gemm"), 2), (("matmul", "matmul"), 2),
                                         (("matmul", "matmul"), 3)])
@pytest.mark.parametrize("before_activation", [False, True])
@pytest.mark.parametrize("preset", ["keras", "torch"])
def test_inference_mode_matches_numpy_batch_norm_on_the_feature_axis(kinds, rank,
                                                                     before_activation, preset):
    model = mlp(kinds=kinds, rank=rank)
    out, report = insert(model, after=["dense_1"], before_activation=before_activation,
                         preset=preset)
    (ins,) = report.insertions
    bn = node(checked(out), "dense_1/BatchNormalization")
    eps, momentum = PRESETS[preset]
    assert attrs(bn) == pytest.approx({"epsilon": eps, "momentum": momentum})
    assert ins.follows == ("layer" if before_activation else "Relu")
    assert producer_op(out, ins.input) == (("Gemm" if kinds[0] == "gemm" else "Add")
                                           if before_activation else "Relu")
    assert count_ops(out)["Transpose"] == (2 if rank == 3 else 0)
    assert ins.transpose == ([0, 2, 1] if rank == 3 else None)
    p = train_params(out, ins)
    stage = "dense_1" if before_activation else "act_1"
    feeds = feeds_for(rank)
    expected = forward(model, feeds["x"],
                       bn=lambda s, v: bn_inference(v, p, eps) if s == stage else v)
    assert_close(run_unoptimised(out, feeds)["y"], expected, "y")


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("preset", ["keras", "torch"])
@pytest.mark.parametrize("before_activation", [False, True])
def test_training_mode_uses_batch_statistics_and_updates_running_ones(rank, preset,
                                                                      before_activation):
    model = mlp(kinds=("matmul", "gemm") if rank == 2 else ("matmul", "matmul"), rank=rank)
    out, report = insert(model, after=["dense_1"], training=True, preset=preset,
                         before_activation=before_activation)
    (ins,) = report.insertions
    checked(out)
    assert report.training and report.upgraded_from is None
    assert ins.running_outputs == ["dense_1/bn.running_mean", "dense_1/bn.running_var"]
    assert [o.name for o in out.graph.output] == ["y", *ins.running_outputs]
    assert attrs(node(out, ins.node))["training_mode"] == 1
    p = train_params(out, ins)
    eps, momentum = PRESETS[preset]
    feeds = feeds_for(rank, seed=2)
    stage = "dense_1" if before_activation else "act_1"
    seen = {}

    def batch_norm(s, v):
        if s != stage:
            return v
        y, seen["mean"], seen["var"] = bn_training(v, p, eps, momentum)
        return y

    expected = forward(model, feeds["x"], bn=batch_norm)
    got = run_unoptimised(out, feeds)
    assert_close(got["y"], expected, "y (batch statistics)")
    assert_close(got[ins.running_outputs[0]], seen["mean"], "updated running mean")
    assert_close(got[ins.running_outputs[1]], seen["var"], "updated running var")


def test_explicit_epsilon_and_momentum_override_the_preset():
    model = mlp()
    out, report = insert(model, after=["dense_1"], preset="torch", epsilon=0.01, momentum=0.5)
    assert attrs(node(out, "dense_1/BatchNormalization")) == pytest.approx(
        {"epsilon": 0.01, "momentum": 0.5})
    p = train_params(out, report.insertions[0], var=(0.001, 0.01))  # epsilon matters here
    feeds = feeds_for(2)
    got = run_unoptimised(out, feeds)["y"]
    expected = {eps: forward(model, feeds["x"],
                             bn=lambda s, v: bn_inference(v, p, eps) if s == "act_1" else v)
                for eps in (0.01, 1e-5)}
    assert_close(got, expected[0.01], "y")
    assert not np.allclose(got, expected[1e-5], atol=ATOL, rtol=RTOL)  # the test can tell


def test_initial_constants_are_written():
    out, report = insert(mlp(), after=["dense_2"], gamma=2.0, beta=-1.0, mean=0.5, var=4.0)
    values = {k: tensor_value(out, v) for k, v in report.insertions[0].params.items()}
    assert {k: v.tolist() for k, v in values.items()} == {
        "gamma": [2.0] * F_OUT, "beta": [-1.0] * F_OUT, "mean": [0.5] * F_OUT,
        "var": [4.0] * F_OUT}
    assert all(v.dtype == np.float32 for v in values.values())


def test_default_initial_values_are_ones_zeros():
    out, report = insert(mlp(), after=["dense_2"])
    values = {k: tensor_value(out, v).tolist() for k, v in report.insertions[0].params.items()}
    assert values == {"gamma": [1.0] * 2, "beta": [0.0] * 2, "mean": [0.0] * 2, "var": [1.0] * 2}


@pytest.mark.parametrize("options, message", [
    ({"epsilon": 0.0}, "epsilon must be a positive"),
    ({"momentum": 1.5}, "momentum must be between 0 and 1"),
    ({"var": -1.0}, "var must be >= 0"),
    ({"gamma": float("nan")}, "gamma must be finite"),
    ({"preset": "caffe"}, "unknown preset 'caffe'"),
    ({"identity": True, "gamma": 2.0}, "identity chooses gamma"),
])
def test_bad_parameters_are_refused(options, message):
    with pytest.raises(BadInput, match=message):
        insert(mlp(), all_layers=True, **options)


def test_value_overflowing_the_dtype_is_refused():
    with pytest.raises(BadInput, match="overflows float16"):
        insert(mlp(dtype="fp16"), all_layers=True, var=1e6)


# --------------------------------------------------------------------------- --identity


@pytest.mark.parametrize("kinds, rank", [(("gemm", "gemm"), 2), (("matmul", "matmul"), 3)])
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
@pytest.mark.parametrize("epsilon", [1e-3, 1e-5, 0.1, 0.3, 1e-7])
def test_identity_is_bit_exact(kinds, rank, dtype, epsilon):
    model = mlp(kinds=kinds, rank=rank, dtype=dtype, final_act="Tanh")
    out, report = insert(model, all_layers=True, identity=True, epsilon=epsilon)
    assert report.verification is not None and report.verification.passed
    assert all((o.atol, o.rtol, o.max_abs) == (0.0, 0.0, 0.0) for o in report.verification.outputs)
    assert not report.notes
    np_type = np.float64 if dtype == "fp64" else np.float32
    compute = np.float64 if dtype == "fp64" else np.float32
    for ins in report.insertions:
        var = tensor_value(out, ins.params["var"])
        assert np.all(compute(var) + compute(np.float32(epsilon)) == 1)
    feeds = feeds_for(rank, dtype=np_type)
    assert np.array_equal(run_unoptimised(out, feeds)["y"], run_unoptimised(model, feeds)["y"])


@given(st.floats(1e-9, 0.999))
@settings(max_examples=300, deadline=None)
def test_identity_variance_makes_var_plus_epsilon_exactly_one(epsilon):
    """In float32 and float64 there is always such a variance near 1 - eps."""
    for dtype, compute in ((TensorProto.FLOAT, np.float32), (TensorProto.DOUBLE, np.float64)):
        var, exact = _identity_var(epsilon, dtype)
        assert exact and compute(var) + compute(np.float32(epsilon)) == 1
        assert float(compute(var)) == var  # stored without rounding


def test_identity_in_float16_says_it_is_not_bit_exact():
    out, report = insert(mlp(dtype="fp16"), all_layers=True, identity=True)
    assert report.verification.passed  # within float16 tolerance
    assert "FLOAT16" in report.notes[0] and "within rounding" in report.notes[0]
    checked(out)


def test_identity_with_training_mode():
    model = mlp(opset=13)
    out, report = insert(model, after=["dense_1"], identity=True, training=True)
    assert report.verification.passed and report.upgraded_from == 13
    assert attrs(node(checked(out), "dense_1/BatchNormalization"))["training_mode"] == 1


# --------------------------------------------------------------------------- names, interface


@pytest.mark.parametrize("rank, kinds", [(2, ("gemm", "gemm")), (3, ("matmul", "matmul"))])
def test_dense_graph_output_name_moves_to_the_bn_result(rank, kinds):
    model = mlp(kinds=kinds, rank=rank)
    out, report = insert(model, after=["dense_2"])
    (ins,) = report.insertions
    checked(out)
    assert [(o.name, o.type) for o in out.graph.output] == \
        [(o.name, o.type) for o in model.graph.output]
    assert ins.output == "y" and ins.input == "dense_2/bn.input"
    assert producer_op(out, "y") == ("Transpose" if rank == 3 else BN)
    assert producer_op(out, "dense_2/bn.input") == ("Gemm" if rank == 2 else "Add")
    p = train_params(out, ins)
    feeds = feeds_for(rank)
    expected = forward(model, feeds["x"], bn=lambda s, v: bn_inference(v, p, 1e-3)
                       if s == "dense_2" else v)
    assert_close(run_unoptimised(out, feeds)["y"], expected, "y")


def test_activation_graph_output_name_moves_to_the_bn_result():
    model = mlp(final_act="Tanh")
    out, report = insert(model, after=["dense_2"])
    (ins,) = report.insertions
    assert ins.follows == "Tanh" and ins.output == "y"
    assert producer_op(checked(out), "dense_2/bn.input") == "Tanh"
    assert [o.name for o in out.graph.output] == ["y"]


def test_everything_else_stays_as_it_was():
    model = mlp(kinds=("matmul", "gemm"), rank=2)
    model.doc_string = "a doc"
    onnx.helper.set_model_props(model, {"author": "me"})
    model.graph.node[0].doc_string = "first node"
    out, report = insert(model, after=["dense_1"])
    (ins,) = report.insertions
    inserted = {ins.node}
    kept = [n for n in out.graph.node if n.name not in inserted]
    assert len(kept) == len(model.graph.node)
    for before, after in zip(model.graph.node, kept):
        expected = onnx.NodeProto()
        expected.CopyFrom(before)
        for i, name in enumerate(expected.input):  # readers of the BN's input now read its result
            if name == ins.input:
                expected.input[i] = ins.output
        assert after == expected
    assert out.doc_string == "a doc" and out.metadata_props == model.metadata_props
    assert out.graph.value_info == model.graph.value_info
    assert out.ir_version == model.ir_version and out.opset_import == model.opset_import
    assert [n.name for n in out.graph.node] == [
        "dense_1", "dense_1/add", "act_1", "dense_1/BatchNormalization", "dense_2"]


def test_insert_does_not_mutate_its_input():
    model = mlp()
    snapshot = model.SerializeToString()
    insert(model, all_layers=True, training=True, identity=True)
    assert model.SerializeToString() == snapshot


def test_new_names_never_collide():
    b = GraphBuilder()
    x = b.input("x", ["batch", F_IN])
    h = b.node("Gemm", [x, b.weight("w", [F_HID, F_IN]), b.weight("b", [F_HID], fan_in=1)],
               name="dense", transB=1, outputs=["dense/bn.gamma"])  # a clash for the gamma name
    b.node("Relu", [h], name="dense/BatchNormalization", outputs=["y"])  # and for the node name
    b.output("y")
    out, report = insert(b.build(), after=["dense"])
    (ins,) = report.insertions
    assert ins.node == "dense/BatchNormalization_1"
    assert ins.params["gamma"] == "dense/bn.gamma_1"
    checked(out)


def test_unnamed_nodes_are_known_by_their_weight():
    model = mlp()
    for n in model.graph.node:
        n.name = ""
    out, report = insert(model, after=["dense_1.W"])
    assert report.insertions[0].node == "dense_1.W/BatchNormalization"
    checked(out)


def test_readers_in_subgraphs_read_the_normalized_value():
    b = GraphBuilder(seed=4)
    x = b.input("x", ["batch", F_IN])
    cond = b.input("cond", [], TensorProto.BOOL)
    h = b.node("Gemm", [x, b.weight("w", [F_HID, F_IN]), b.weight("b", [F_HID], fan_in=1)],
               name="dense", transB=1)
    out_vi = [helper.make_tensor_value_info("branch_y", TensorProto.FLOAT, None)]
    then = helper.make_graph([helper.make_node("Identity", [h], ["branch_y"])], "then", [], out_vi)
    other = helper.make_graph([helper.make_node("Neg", [h], ["branch_y"])], "else", [], out_vi)
    b.node("If", [cond], name="if", outputs=["y"], then_branch=then, else_branch=other)
    b.output("y")
    model = b.build()
    out, report = insert(model, after=["dense"])
    p = train_params(out, report.insertions[0])
    feeds = {**feeds_for(2), "cond": np.array(True)}
    gemm = run_unoptimised(model, feeds)["y"].astype(np.float64)
    assert_close(run_unoptimised(checked(out), feeds)["y"], bn_inference(gemm, p, 1e-3), "y")


# --------------------------------------------------------------------------- refusals


def test_layer_without_known_feature_count_is_refused():
    b = GraphBuilder()
    x = b.input("x", ["batch", F_IN])
    w = b.input("w", ["n", "k"])  # a Gemm whose weight is a graph input of unknown size
    b.node("Gemm", [x, w], name="dense", transB=1, outputs=["y"])
    b.output("y")
    with pytest.raises(BadInput, match="layer dense .* feature count cannot be determined"):
        insert(b.build(), after=["dense"])


def test_rank_1_output_is_refused():
    b = GraphBuilder()
    x = b.input("x", [F_IN])
    b.node("MatMul", [x, b.weight("w", [F_IN, F_HID])], name="dense", outputs=["y"])
    b.output("y")
    with pytest.raises(BadInput, match="rank 1"):
        insert(b.build(), after=["dense"])


# --------------------------------------------------------------------------- IR 3, opsets


@pytest.mark.parametrize("opset", [7, 8])
def test_ir3_model_lists_new_initializers_as_inputs(opset):
    model = mlp(kinds=("gemm", "gemm"), opset=opset, ir_version=3)
    out, report = insert(model, after=["dense_1"])
    (ins,) = report.insertions
    assert out.ir_version == 3
    assert set(ins.params.values()) <= {i.name for i in out.graph.input}
    assert attrs(node(checked(out), ins.node))["spatial"] == 1
    p = train_params(out, ins)
    for i in out.graph.input:  # keep the listed types in step with the new values
        if i.name in ins.params.values():
            assert i.type.tensor_type.elem_type == TensorProto.FLOAT
    feeds = feeds_for(2)
    expected = forward(model, feeds["x"],
                       bn=lambda s, v: bn_inference(v, p, 1e-3) if s == "act_1" else v)
    assert_close(run_unoptimised(out, feeds)["y"], expected, "y")


@pytest.mark.parametrize("opset, ir_version", [(13, None), (9, 4), (8, 3)])
def test_training_upgrades_older_opsets(opset, ir_version):
    model = mlp(kinds=("matmul", "gemm"), opset=opset, ir_version=ir_version)
    out, report = insert(model, after=["dense_1"], training=True)
    assert (report.upgraded_from, report.opset) == (opset, 15)
    assert next(o.version for o in out.opset_import if o.domain == "") == 15
    assert "opset upgraded" in report.to_text()
    (ins,) = report.insertions
    p = train_params(checked(out), ins)
    feeds = feeds_for(2, seed=5)
    seen = {}

    def batch_norm(s, v):
        if s != "act_1":
            return v
        y, seen["mean"], seen["var"] = bn_training(v, p, 1e-3, 0.99)
        return y

    expected = forward(model, feeds["x"], bn=batch_norm)
    got = run_unoptimised(out, feeds)
    assert_close(got["y"], expected, "y")
    assert_close(got["dense_1/bn.running_var"], seen["var"], "running var")


def test_inference_mode_keeps_the_opset():
    out, report = insert(mlp(opset=13), all_layers=True)
    assert report.opset == 13 and report.upgraded_from is None
    assert out.opset_import == mlp(opset=13).opset_import


def test_failed_opset_conversion_is_refused(monkeypatch):
    def refuse(model, version):
        raise RuntimeError("No adapter for op Foo\nmore detail")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    with pytest.raises(BadInput, match="converting opset 13 failed: No adapter for op Foo$"):
        insert(mlp(opset=13), all_layers=True, training=True)


def test_conversion_that_changes_the_outputs_is_refused(monkeypatch):
    real = onnx.version_converter.convert_version

    def wrong(model, version):
        converted = real(model, version)
        for t in converted.graph.initializer:
            if t.name == "dense_2.b":
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + 1, t.name))
        return converted

    monkeypatch.setattr(onnx.version_converter, "convert_version", wrong)
    with pytest.raises(BadInput, match="converting opset 13 changed the outputs"):
        insert(mlp(opset=13), all_layers=True, training=True)


def test_parameters_are_the_values_asked_for_to_the_sign_of_zero():
    """The layers of one width share each parameter tensor, made once per insert: -0.0 for
    beta beside mean's 0.0 in one call, or in a later call, gets a tensor of its own."""
    def params(role, **options):
        model, _ = insert(mlp(kinds=("gemm", "matmul")), all_layers=True, **options)
        return [numpy_helper.to_array(t) for t in model.graph.initializer
                if t.name.endswith(f"bn.{role}")]

    assert all(not np.signbit(b).any() for b in params("beta", beta=0.0))
    negative = params("beta", beta=-0.0)
    assert negative and all(np.signbit(b).all() and not b.any() for b in negative)
    means = params("mean", beta=-0.0)  # made after beta's -0.0, in the same call
    assert means and all(not np.signbit(m).any() and not m.any() for m in means)
    assert all((b == np.float32(2.5)).all() for b in params("beta", beta=2.5))


# --------------------------------------------------------------------------- the command


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(mlp(kinds=("gemm", "matmul")), path)
    return path


def invoke(*args):
    return CliRunner().invoke(insert_command, [str(a) for a in args])


@pytest.mark.parametrize("selection, layers", [
    (["--after", "dense_1"], ["dense_1"]),
    (["--after", "dense_?"], ["dense_1", "dense_2"]),
    (["--after", "dense_2", "--after", "dense_1"], ["dense_1", "dense_2"]),
    (["--op", "MatMul"], ["dense_2"]),
    (["--all"], ["dense_1", "dense_2"]),
])
def test_cli_selection(model_file, tmp_path, selection, layers):
    out_path, json_path = tmp_path / "out.onnx", tmp_path / "report.json"
    result = invoke(model_file, "-o", out_path, *selection, "--json", json_path)
    assert result.exit_code == 0, result.output
    report = json.loads(json_path.read_text())
    assert [i["layer"] for i in report["insertions"]] == layers
    assert report["inserted"] == len(layers) and report["epsilon"] == 1e-3
    out = checked(onnx.load(out_path))
    assert [n.name for n in out.graph.node if n.op_type == BN] == \
        [f"{layer}/BatchNormalization" for layer in layers]
    assert "inserted" in result.output


@pytest.mark.parametrize("args, message", [
    (["--after", "dense_7"], "no layer matches 'dense_7'; layers: dense_1, dense_2"),
    (["--op", "Conv"], "no Conv layer in the model; layers: dense_1, dense_2"),
    (["--all", "--identity", "--gamma", "1"], "--identity chooses the initial values itself"),
    (["--all", "--momentum", "2"], "momentum must be between 0 and 1"),
])
def test_cli_errors_exit_2_and_write_nothing(model_file, tmp_path, args, message):
    out_path = tmp_path / "out.onnx"
    result = invoke(model_file, "-o", out_path, *args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: ") and message in lines[0]
    assert not out_path.exists()
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_cli_missing_input_is_one_line(tmp_path):
    result = invoke(tmp_path / "nope.onnx", "-o", tmp_path / "out.onnx", "--all")
    assert result.exit_code == 2
    assert result.output.strip() == f"bnfold: error: {tmp_path / 'nope.onnx'}: no such file"


def test_cli_in_place_training_quiet(model_file):
    result = invoke(model_file, "--in-place", "--all", "--training", "--preset", "torch", "-q")
    assert result.exit_code == 0 and result.output == ""
    out = checked(onnx.load(model_file))
    assert [attrs(n) for n in out.graph.node if n.op_type == BN] == [pytest.approx(
        {"epsilon": 1e-5, "momentum": 0.9, "training_mode": 1})] * 2
    assert len(out.graph.output) == 5


def test_cli_identity_reports_the_check(model_file, tmp_path):
    result = invoke(model_file, "-o", tmp_path / "out.onnx", "--all", "--identity")
    assert result.exit_code == 0, result.output
    assert "verification passed" in result.output and "max abs 0" in result.output


def test_cli_identity_that_is_not_exits_1_and_writes_nothing(model_file, tmp_path, monkeypatch):
    import bnfold.insert

    monkeypatch.setattr(sys.modules["bnfold.insert"], "_identity_var", lambda eps, dtype: (4.0, True))
    result = invoke(model_file, "-o", tmp_path / "out.onnx", "--all", "--identity")
    assert result.exit_code == 1
    assert result.output.startswith("bnfold: error: the inserted identity BatchNormalization "
                                    "changed the model's outputs: y (float32")
    assert not (tmp_path / "out.onnx").exists()


def test_cli_needs_an_output(model_file):
    result = invoke(model_file, "--all")
    assert result.exit_code == 2
    assert result.output == "bnfold: error: no output: give -o OUTPUT or --in-place\n"


def test_cli_output_and_in_place_conflict(model_file, tmp_path):
    result = invoke(model_file, "-o", tmp_path / "out.onnx", "--in-place", "--all")
    assert result.exit_code == 2 and "--in-place overwrites INPUT" in result.output


# --------------------------------------------------------------------------- real exports


def torch_export(module: nn.Module, shape: tuple[int, ...], path) -> onnx.ModelProto:
    """The TorchScript exporter's ONNX of `module` (eval mode), batch axis symbolic."""
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(*shape),), str(path), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    return onnx.load(path)


class _Mlp(nn.Module):
    def __init__(self, bn: nn.Module | None = None, before_activation: bool = False):
        super().__init__()
        self.l1, self.l2 = nn.Linear(F_IN, F_HID), nn.Linear(F_HID, F_OUT)
        self.bn, self.before_activation = bn, before_activation

    def forward(self, x):
        h = self.l1(x)
        if self.bn is not None and self.before_activation:
            h = self.bn(h)
        h = torch.relu(h)
        if self.bn is not None and not self.before_activation:
            h = self.bn(h)
        return self.l2(h)


class _LastAxisBatchNorm(nn.BatchNorm1d):
    """torch's BatchNorm1d over the last axis of [N, T, F] (Keras's axis=-1)."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2) if x.dim() == 3 else \
            super().forward(x)


def _trained_bn(seed: int) -> _LastAxisBatchNorm:
    bn = _LastAxisBatchNorm(F_HID, eps=1e-5, momentum=0.1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(F_HID, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(F_HID, generator=g))
        bn.running_mean.copy_(torch.randn(F_HID, generator=g))
        bn.running_var.copy_(torch.rand(F_HID, generator=g) * 2.7 + 0.3)
    return bn


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("before_activation", [False, True])
def test_torch_export_matches_torch_with_batch_norm(tmp_path, rank, before_activation):
    torch.manual_seed(0)
    plain = _Mlp()
    shape = (BATCH, F_IN) if rank == 2 else (BATCH, SEQ, F_IN)
    model = torch_export(plain, shape, tmp_path / "mlp.onnx")
    layer = "/l1/Gemm" if rank == 2 else "/l1/MatMul"
    out, report = insert(model, after=["/l1/*"], preset="torch",
                         before_activation=before_activation)
    (ins,) = report.insertions
    assert ins.layer == layer and ins.op == ("Gemm" if rank == 2 else "MatMul")
    bn = _trained_bn(seed=rank)
    for key, value in {"gamma": bn.weight, "beta": bn.bias, "mean": bn.running_mean,
                       "var": bn.running_var}.items():
        for t in out.graph.initializer:
            if t.name == ins.params[key]:
                t.CopyFrom(numpy_helper.from_array(value.detach().numpy(), t.name))
    with_bn = _Mlp(bn, before_activation).eval()
    with_bn.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = with_bn(x).numpy()
    assert_close(run_unoptimised(checked(out), {"x": x.numpy()})["y"], expected, "y vs torch")


def test_torch_training_mode_matches_torch_train_forward(tmp_path):
    """Same batch-normalized output as torch in train mode; the running mean moves as torch's
    with momentum 1 - 0.1. (torch's running var uses the unbiased batch variance, ONNX's the
    population one: that output is checked against numpy in the tests above.)"""
    torch.manual_seed(0)
    plain = _Mlp()
    model = torch_export(plain, (BATCH, SEQ, F_IN), tmp_path / "mlp.onnx")
    out, report = insert(model, after=["/l1/MatMul"], preset="torch", training=True)
    (ins,) = report.insertions
    bn = _trained_bn(seed=7)
    for key, value in {"gamma": bn.weight, "beta": bn.bias, "mean": bn.running_mean,
                       "var": bn.running_var}.items():
        for t in out.graph.initializer:
            if t.name == ins.params[key]:
                t.CopyFrom(numpy_helper.from_array(value.detach().numpy(), t.name))
    with_bn = _Mlp(bn).train()
    with_bn.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(BATCH, SEQ, F_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = with_bn(x).numpy()
    got = run_unoptimised(checked(out), {"x": x.numpy()})
    assert_close(got["y"], expected, "y vs torch train mode")
    assert_close(got[ins.running_outputs[0]], bn.running_mean.numpy(), "running mean vs torch")


def keras_export(build, shape, path):
    """A Keras 3 model (torch backend) exported to ONNX, and the model itself."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = build(keras)
    model(np.zeros((2, *shape), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.export(str(path), format="onnx", verbose=False)
    return onnx.load(path), model


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras's own, under numpy 2
@pytest.mark.parametrize("shape", [(F_IN,), (SEQ, F_IN)])
def test_keras_export_matches_keras_with_batch_norm(tmp_path, shape):
    def dense(keras):
        inp = keras.Input(shape)
        h = keras.layers.Dense(F_HID, activation="relu", name="dense_1")(inp)
        return keras.Model(inp, keras.layers.Dense(F_OUT, name="dense_2")(h))

    model, plain = keras_export(dense, shape, tmp_path / "dense.onnx")
    out, report = insert(model, after=["/MatMul"])  # Keras 3 exports unnamed layers
    (ins,) = report.insertions
    assert (ins.op, ins.features, ins.follows) == ("MatMul", F_HID, "Relu")
    assert ins.transpose == (None if len(shape) == 1 else [0, 2, 1])
    p = train_params(out, ins)

    import keras
    inp = keras.Input(shape)
    h = keras.layers.Dense(F_HID, activation="relu", name="dense_1")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)  # axis=-1, epsilon 1e-3
    with_bn = keras.Model(inp, keras.layers.Dense(F_OUT, name="dense_2")(h))
    for name in ("dense_1", "dense_2"):
        with_bn.get_layer(name).set_weights(plain.get_layer(name).get_weights())
    with_bn.get_layer("bn").set_weights([p[k].astype(np.float32)
                                         for k in ("gamma", "beta", "mean", "var")])
    x = np.random.default_rng(3).normal(0.5, 1.5, (BATCH, *shape)).astype(np.float32)
    expected = np.asarray(with_bn.predict(x, verbose=0))
    (name,) = [o.name for o in out.graph.output]
    feed = {out.graph.input[0].name: x}
    assert_close(run_unoptimised(checked(out), feed)[name], expected, "y vs Keras")


# --------------------------------------------------------------------------- round trip


def assert_round_trip(model: onnx.ModelProto, **options) -> None:
    """insert -> trained-looking parameters -> fold: no inserted BN left, same outputs."""
    inserted, report = insert(model, **options)
    assert report.insertions
    for i, ins in enumerate(report.insertions):
        train_params(inserted, ins, seed=10 + i)
    folded, fold_report = fold(inserted)
    ours = {ins.node for ins in report.insertions}
    left = [n.name for n in folded.graph.node if n.name in ours]
    assert not left, [d.describe() for d in fold_report.kept]
    assert {d.node for d in fold_report.folded} >= ours
    checked(folded)
    feeds = {i.name: v for i, v in zip(_feedable(inserted), _random_inputs(inserted))}
    expected, got = run_unoptimised(inserted, feeds), run_unoptimised(folded, feeds)
    for name, value in expected.items():
        assert_close(got[name], value, name, atol=1e-5 * max(1.0, np.abs(value).max()))


def _feedable(model):
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _random_inputs(model):
    rng = np.random.default_rng(0)
    values = []
    for i in _feedable(model):
        dims = [d.dim_value if d.HasField("dim_value") else 7 for d in i.type.tensor_type.shape.dim]
        values.append(rng.normal(0.3, 1.2, dims).astype(
            helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)))
    return values


COMMITTED = sorted(glob.glob(str(MODELS_DIR / "*.onnx")))


@pytest.mark.skipif(not COMMITTED, reason="no models committed in models/")
@pytest.mark.parametrize("path", COMMITTED, ids=os.path.basename)
@pytest.mark.parametrize("before_activation", [False, True])
def test_round_trip_on_committed_models(path, before_activation):
    assert_round_trip(onnx.load(path), all_layers=True, before_activation=before_activation)


@pytest.mark.skipif(not COMMITTED, reason="no models committed in models/")
@pytest.mark.parametrize("path", [p for p in COMMITTED if "cnn" in p], ids=os.path.basename)
def test_round_trip_with_conv_layers(path):
    assert_round_trip(onnx.load(path), ops=["Conv", "Gemm", "MatMul"], all_layers=True)


@pytest.mark.parametrize("rank, before_activation", [(2, False), (2, True), (3, True)])
def test_round_trip_on_torch_mlp(tmp_path, rank, before_activation):
    torch.manual_seed(0)
    shape = (BATCH, F_IN) if rank == 2 else (BATCH, SEQ, F_IN)
    model = torch_export(_Mlp(), shape, tmp_path / "mlp.onnx")
    assert_round_trip(model, all_layers=True, before_activation=before_activation)


def test_round_trip_rank3_after_activation(tmp_path):
    torch.manual_seed(0)
    model = torch_export(_Mlp(), (BATCH, SEQ, F_IN), tmp_path / "mlp.onnx")
    assert_round_trip(model, after=["/l1/MatMul"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_round_trip_on_keras_export(tmp_path):
    def mlp_keras(keras):
        inp = keras.Input((F_IN,))
        h = keras.layers.Dense(F_HID, activation="relu")(inp)
        h = keras.layers.Dense(F_HID, activation="tanh")(h)
        return keras.Model(inp, keras.layers.Dense(F_OUT)(h))

    model, _ = keras_export(mlp_keras, (F_IN,), tmp_path / "k.onnx")
    assert_round_trip(model, all_layers=True)
    assert_round_trip(model, all_layers=True, before_activation=True)


def test_round_trip_after_training_batches(tmp_path):
    """Training-mode batches move the running statistics; written back into an inference-mode
    insertion, they fold away and the folded model computes what the trained one does."""
    model = mlp(kinds=("gemm", "matmul"))
    training, report = insert(model, all_layers=True, training=True)
    stats = {}
    for step in range(3):
        got = run_unoptimised(training, feeds_for(2, seed=step))
        for ins in report.insertions:
            mean, var = (got[n] for n in ins.running_outputs)
            for t in training.graph.initializer:  # feed the statistics back, as a trainer would
                if t.name in (ins.params["mean"], ins.params["var"]):
                    value = mean if t.name == ins.params["mean"] else var
                    t.CopyFrom(numpy_helper.from_array(value, t.name))
            stats[ins.node] = (mean, var)
    inference, report = insert(model, all_layers=True)
    for ins in report.insertions:
        mean, var = stats[ins.node]
        assert not np.allclose(mean, 0) and not np.allclose(var, 1)  # they moved
        for t in inference.graph.initializer:
            if t.name in (ins.params["mean"], ins.params["var"]):
                value = mean if t.name == ins.params["mean"] else var
                t.CopyFrom(numpy_helper.from_array(value, t.name))
    folded, fold_report = fold(inference)
    assert count_ops(folded)[BN] == 0 and len(fold_report.folded) == 2
    feeds = feeds_for(2, seed=9)
    assert_close(run_unoptimised(folded, feeds)["y"], run_unoptimised(inference, feeds)["y"], "y")


def test_the_issue_commands_through_bnfold_main(tmp_path):
    """`bnfold inspect model.onnx` then `bnfold insert model.onnx -o model.bn.onnx --after ...`."""
    from bnfold.cli import main

    path = tmp_path / "model.onnx"
    onnx.save(mlp(), path)
    runner = CliRunner()
    listed = runner.invoke(main, ["inspect", str(path)])
    assert listed.exit_code == 0 and "dense_2  Gemm  4   2" in listed.output
    done = runner.invoke(main, ["insert", str(path), "-o", str(tmp_path / "model.bn.onnx"),
                                "--after", "dense_2"])
    assert done.exit_code == 0, done.output
    assert count_ops(checked(onnx.load(tmp_path / "model.bn.onnx")))[BN] == 1
    missing = runner.invoke(main, ["insert", str(path), "-o", str(tmp_path / "x.onnx"),
                                   "--after", "dense_3"])
    assert missing.exit_code == 2
    assert missing.output == ("bnfold: error: no layer matches 'dense_3'; layers: dense_1, dense_2 "
                              "(select by name, a glob ('dense_*'), or position in graph order: "
                              "'#1' to '#2', as `bnfold inspect` numbers them)\n")
