"""Regression tests for folds that were wrong while the check passed (issue 7): names shadowed in
subgraphs, stale value_info, fp16 range, broadcasting affine maps, and float32 epsilon.

Each builds the tiny model that broke and compares the folded model with the original in
unoptimised onnxruntime on the inputs that showed the bug.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builders import (
    SPATIAL,
    GraphBuilder,
    bn_affine,
    conv_bn,
    count_ops,
    find_node,
    fold_checked,
    kept_reason,
    random_feeds,
    run_model,
    tensor_value,
    trained_bn_params,
)


# --- (a) scoping of names in subgraphs -----------------------------------------------------

def loop_shadowing_bn_scale(*, seed: int = 0) -> onnx.ModelProto:
    """x -> Conv -> BN(bn_*) -> Loop(trips) whose body carries a value named `bn_scale`, like
    the outer initializer, starting from it and growing each iteration; the body's BN reads
    that carried value as its scale (its other parameters from the outer scope)."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["batch", 4, *SPATIAL[2]])
    trips = b.input("trips", [], TensorProto.INT64)
    keep_going = b.const("keep_going", np.array(True))
    y = b.node("Conv", [x, b.weight("W0", [4, 4, 1, 1])], name="conv0", kernel_shape=[1, 1])
    y = b.bn(y, 4, name="bn")
    body = GraphBuilder(seed=seed + 1, name="loop_body")
    body.input("i", [], TensorProto.INT64)
    body.input("cond_in", [], TensorProto.BOOL)
    body.input("v_in", ["batch", 4, *SPATIAL[2]])
    body.input("bn_scale", [4])  # shadows the outer initializer of the same name
    conv = body.node("Conv", ["v_in", body.weight("body_W", [4, 4, 1, 1])], name="body_conv",
                     kernel_shape=[1, 1])
    body.nodes.append(helper.make_node("BatchNormalization",
                                       [conv, "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                                       ["body_bn_out"], name="body_bn"))
    body.node("Tanh", ["body_bn_out"], name="body_act", outputs=["v_out"])
    growth = body.const("growth", np.full([4], 1.5, np.float32))
    body.node("Mul", ["bn_scale", growth], name="grow", outputs=["s_out"])
    body.node("Identity", ["cond_in"], name="body_cond", outputs=["cond_out"])
    graph = body.subgraph([
        helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
        helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["batch", 4, *SPATIAL[2]]),
        helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [4]),
    ])
    b.node("Loop", [trips, keep_going, y, "bn_scale"], name="loop", outputs=["y", "s_final"],
           body=graph)
    b.output("y", declared=helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                          ["batch", 4, *SPATIAL[2]]))
    return b.build()


def _trip_feeds(model, trips):
    feeds = []
    for n in trips:
        f = random_feeds(model, seed=n)
        f["trips"] = np.array(n, dtype=np.int64)
        feeds.append(f)
    return feeds


def test_loop_body_input_shadowing_an_outer_bn_parameter_is_not_that_constant():
    model = loop_shadowing_bn_scale()
    folded, report = fold_checked(model, _trip_feeds(model, [1, 2, 5, 8]))
    decisions = {d.node: d for d in report.decisions}
    assert decisions["bn"].action == "folded"  # the outer BN reads the initializer: it folds
    assert decisions["body_bn"].action == "kept"
    assert "'bn_scale' is not constant" in decisions["body_bn"].reason
    assert count_ops(folded)["BatchNormalization"] == 1


def test_rename_uses_stops_at_a_subgraph_that_redefines_the_name():
    from bnfold.graph import rename_uses

    body = helper.make_graph(
        [helper.make_node("Neg", ["v"], ["w"]), helper.make_node("Relu", ["outer"], ["u"])],
        "body", [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("u", TensorProto.FLOAT, [1])])
    shadowing = helper.make_graph(
        [helper.make_node("Neg", ["v"], ["w"])], "shadowing",
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["v"], ["r"]),
         helper.make_node("If", ["c"], ["a", "b"], then_branch=body, else_branch=body),
         helper.make_node("Scan", ["r"], ["s"], body=shadowing, num_scan_inputs=1)],
        "main", [], [])
    rename_uses(graph, "v", "v2")
    rename_uses(graph, "outer", "outer2")
    assert list(graph.node[0].input) == ["v2"]
    then = graph.node[1].attribute[0].g
    assert list(then.node[0].input) == ["v"]  # the body's own input v
    assert list(then.node[1].input) == ["outer2"]  # an outer value: renamed
    assert list(graph.node[2].attribute[0].g.node[0].input) == ["v"]


# --- float32 epsilon -----------------------------------------------------------------------

@pytest.mark.parametrize("epsilon", [None, 1e-5, 1e-3])
def test_var_minus_float32_epsilon_is_kept_not_folded(epsilon):
    """var = -eps in float32 gives var + eps == 0 in onnxruntime (float32): BN must stay.
    With the double 1e-5 the sum was 2.5e-13 and the fold scaled the channel by 2e6."""
    eps32 = np.float32(1e-5 if epsilon is None else epsilon)
    params = trained_bn_params(6, np.random.default_rng(1))
    params["var"][3] = -float(eps32)
    attrs = {} if epsilon is None else {"epsilon": float(eps32)}
    model = conv_bn(bn_values=params, **attrs)
    if epsilon is None:
        assert not any(a.name == "epsilon" for n in model.graph.node for a in n.attribute)
    _, report = fold_checked(model)
    assert "var + eps <= 0 on channel 3" in kept_reason(report)


def test_default_epsilon_is_the_float32_value():
    """With var + eps near 1e-7 the double and the float32 1e-5 give scales 2.5e-6 apart
    (40 float32 ulps): the folded weights must use the float32 one, as onnxruntime does."""
    params = trained_bn_params(6, np.random.default_rng(4))
    params["var"][:] = np.float32(-9.9e-6)
    model = conv_bn(bn_values=params)
    folded, report = fold_checked(model)
    assert len(report.folded) == 1
    stored = {k: v.astype(np.float32).astype(np.float64) for k, v in params.items()}
    w = tensor_value(model, "conv_W").astype(np.float64)
    as_float32 = bn_affine(stored)[0]
    as_double = stored["scale"] / np.sqrt(stored["var"] + 1e-5)
    for s, expected_equal in ((as_float32, True), (as_double, False)):
        expected = (w * s[:, None, None, None]).astype(np.float32)
        got = tensor_value(folded, find_node(folded, "Conv").input[1])
        assert np.array_equal(got, expected) == expected_equal, eps


# --- (b) shapes from the graph's own dims, not from stale value_info -----------------------

def matmul3d_bn_with_stale_value_info() -> onnx.ModelProto:
    """x[batch, seq, 8] -> MatMul(W[8, 4]) -> BN(4) -> y: BN normalises axis 1, `seq` (the
    model runs at seq = 4 only), not MatMul's feature axis. A stale value_info says the
    MatMul output is [batch, 4], which made it look like a rank-2 Dense output."""
    b = GraphBuilder(seed=0)
    x = b.input("x", ["batch", "seq", 8])
    y = b.node("MatMul", [x, b.weight("W", [8, 4])], name="matmul")
    b.bn(y, 4, name="bn", out="y")
    b.output("y")
    model = b.build(value_info=False)
    model.graph.value_info.append(
        helper.make_tensor_value_info("matmul_out", TensorProto.FLOAT, ["batch", 4]))
    return model


def test_stale_value_info_rank_does_not_make_a_sequence_axis_a_feature_axis():
    from bnfold.fold import fold

    model = matmul3d_bn_with_stale_value_info()  # (onnx.checker's full check rejects it)
    folded, report = fold(model)
    assert "MatMul output has rank 3" in kept_reason(report)
    assert folded.SerializeToString() == model.SerializeToString()  # nothing to fold
    for i, batch in enumerate((1, 3)):
        feeds = random_feeds(model, seed=i, dims={"seq": 4, "batch": batch})
        np.testing.assert_array_equal(run_model(folded, feeds)["y"], run_model(model, feeds)["y"])


def test_stale_declared_output_shape_is_not_trusted():
    """The graph output's declared shape [batch, 4] is stale in the same way."""
    model = matmul3d_bn_with_stale_value_info()
    del model.graph.value_info[:]
    out = model.graph.output[0].type.tensor_type.shape
    del out.dim[:]
    out.dim.add().dim_param = "batch"
    out.dim.add().dim_value = 4
    from bnfold.graph import infer_shapes

    shapes, _ = infer_shapes(model)
    assert shapes["y"] == ("batch", "seq", 4) and shapes["matmul_out"] == ("batch", "seq", 4)


def test_unknown_rank_refuses_a_matmul_fold():
    """x reshaped by a runtime shape of unknown length: the MatMul output's rank is unknown,
    so whether BN's axis 1 is its feature axis is unknown (here it is not)."""
    b = GraphBuilder(seed=0)
    x = b.input("x", ["n"])
    shape = b.input("shape", ["r"], TensorProto.INT64)
    x = b.node("Reshape", [x, shape], name="reshape")
    y = b.node("MatMul", [x, b.weight("W", [8, 4])], name="matmul")
    b.bn(y, 4, name="bn", out="y")
    b.output("y", declared=helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", "c"]))
    model = b.build(value_info=False)
    feeds = {"x": np.random.default_rng(0).normal(size=96).astype(np.float32),
             "shape": np.array([3, 4, 8], dtype=np.int64)}
    _, report = fold_checked(model, feeds)
    assert "rank of matmul's output is unknown" in kept_reason(report)


# --- (d) an affine map that broadcasts is not per-channel ----------------------------------

def broadcasting_chain(x_channels, const_shape, *, layer: str = "Conv") -> onnx.ModelProto:
    """x[batch, x_channels, 3, 2] -> Relu -> Mul(c) -> Add(d) -> Conv | Flatten+Gemm, where the
    constants have `const_shape`: with x_channels 1 and [1, 4, 1, 1] the chain turns one
    channel into four."""
    b = GraphBuilder(seed=0)
    x = b.node("Relu", [b.input("x", ["batch", x_channels, 3, 2])], name="relu")
    rng = np.random.default_rng(5)
    y = b.node("Mul", [x, b.const("c", rng.uniform(0.5, 2, const_shape).astype(np.float32))],
               name="mul")
    y = b.node("Add", [y, b.const("d", rng.normal(0, 1, const_shape).astype(np.float32))],
               name="add")
    if layer == "Conv":
        b.node("Conv", [y, b.weight("W", [6, 4, 1, 1])], name="conv", kernel_shape=[1, 1],
               outputs=["y"])
    else:
        y = b.node("Flatten", [y], name="flatten", axis=1)
        b.node("Gemm", [y, b.weight("W", [6, 24]), b.weight("B", [6], fan_in=1)], name="gemm",
               transB=1, outputs=["y"])
    b.output("y")
    return b.build()


@pytest.mark.parametrize("layer", ["Conv", "Gemm"])
@pytest.mark.parametrize("const_shape", [[1, 4, 1, 1], [4, 1, 1]])
def test_chain_broadcasting_one_channel_to_four_is_not_folded_forward(layer, const_shape):
    model = broadcasting_chain(1, const_shape, layer=layer)
    folded, report = fold_checked(model)  # the folded model runs and agrees
    (decision,) = report.kept
    assert "broadcasts relu_out" in decision.reason and "not a per-channel map" in decision.reason
    assert not report.changed


def test_chain_broadcasting_symbolic_dim_is_not_per_channel():
    """x[batch, 4] * c[1, 4] + d[3, 1]: d turns a batch of 1 into 3 rows; that it matches
    at batch 3 proves nothing, so it is refused."""
    b = GraphBuilder(seed=0)
    x = b.node("Relu", [b.input("x", ["batch", 4])], name="relu")
    y = b.node("Mul", [x, b.const("c", np.full([1, 4], 2.0, np.float32))], name="mul")
    y = b.node("Add", [y, b.const("d", np.ones([3, 1], np.float32))], name="add")
    b.node("Gemm", [y, b.weight("W", [6, 4]), b.weight("B", [6], fan_in=1)], name="gemm",
           transB=1, outputs=["y"])
    b.output("y")
    model = b.build()
    _, report = fold_checked(model, random_feeds(model, dims={"batch": 3}))
    assert "broadcasts relu_out (size 'batch'" in report.kept[0].reason


def test_per_channel_chain_with_matching_channels_still_folds():
    model = broadcasting_chain(4, [1, 4, 1, 1])
    folded, report = fold_checked(model)
    assert [d.action for d in report.decisions] == ["folded"]


def test_cli_broadcasting_chain_output_runs_with_and_without_the_check(tmp_path):
    from click.testing import CliRunner

    from bnfold.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(broadcasting_chain(1, [1, 4, 1, 1]), str(path))
    feeds = random_feeds(onnx.load(str(path)))
    expected = run_model(onnx.load(str(path)), feeds)["y"]
    for flags in ([], ["--no-verify"]):
        out = tmp_path / f"out{len(flags)}.onnx"
        result = CliRunner().invoke(main, ["fold", str(path), "-o", str(out), *flags])
        assert result.exit_code == 0, result.output
        np.testing.assert_array_equal(run_model(onnx.load(str(out)), feeds)["y"], expected)


# --- (c) float16 range: inputs in 0..255 ---------------------------------------------------

def _image_feeds(model, n=4):
    """Inputs in 0..255 (images), float16, several seeds."""
    feeds = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        feeds.append({k: rng.integers(0, 256, v.shape).astype(np.float16)
                      for k, v in random_feeds(model, seed).items()})
    return feeds


def fp16_matmul_bn(*, bias: bool, gamma: float = 1.0) -> onnx.ModelProto:
    """x[batch, 4] (0..255) -> MatMul(W ~ 10) [-> Add] -> BN(s = 8 * gamma, mean 6000) -> y:
    Wx reaches 12000 and the BN output +-50000, both finite in fp16; 8 * Wx is not."""
    b = GraphBuilder("fp16", seed=0)
    x = b.input("x", ["batch", 4])
    w = b.const("W", b.rng.uniform(8, 12, (4, 6)).astype(np.float16))
    y = b.node("MatMul", [x, w], name="matmul")
    if bias:
        y = b.node("Add", [y, b.const("B", np.full(6, 10, np.float16))], name="add")
    params = {"scale": np.full(6, gamma), "bias": np.zeros(6), "mean": np.full(6, 6000.0),
              "var": np.full(6, 1 / 64 - float(np.float32(1e-5)))}
    b.bn(y, 6, name="bn", out="y", params=params)
    b.output("y")
    return b.build()


@pytest.mark.parametrize("bias", [False, True], ids=["matmul", "matmul_add"])
def test_fp16_backward_fold_with_separate_shift_that_grows_the_output_is_refused(bias):
    model = fp16_matmul_bn(bias=bias)
    feeds = _image_feeds(model)
    for f in feeds:  # the premise: the original is finite on these inputs
        assert np.all(np.isfinite(run_model(model, f)["y"]))
    folded, report = fold_checked(model, feeds, dtype="fp16")
    assert "float16: matmul's output would be scaled by up to 7.99" in kept_reason(report)
    for f in feeds:
        assert np.all(np.isfinite(run_model(folded, f)["y"]))


def test_fp16_backward_fold_with_separate_shift_folds_when_no_scale_exceeds_one():
    """s = 0.8: no intermediate grows. The folded MatMul output, near 5000, is rounded to fp16
    (ulp 4) and its weights W*s too, so it is a few units off the original, whose BN computes
    in float32: within 4 ulps of the intermediate (that cancellation is the check's to judge)."""
    from bnfold.fold import fold

    model = fp16_matmul_bn(bias=True, gamma=0.1)
    folded, report = fold(model)
    assert len(report.folded) == 1
    onnx.checker.check_model(folded, full_check=True)
    for f in _image_feeds(model):
        got, expected = run_model(folded, f)["y"], run_model(model, f)["y"]
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got.astype(np.float64), expected.astype(np.float64), atol=16)


def test_fp16_backward_fold_into_conv_own_bias_stays_in_range():
    """Conv adds its bias in float32 inside the kernel: s*Wx never exists as fp16."""
    b = GraphBuilder("fp16", seed=0)
    x = b.input("x", ["batch", 4, 3, 2])
    w = b.const("W", b.rng.uniform(8, 12, (6, 4, 1, 1)).astype(np.float16))
    y = b.node("Conv", [x, w], name="conv", kernel_shape=[1, 1])
    params = {"scale": np.full(6, 1.0), "bias": np.zeros(6), "mean": np.full(6, 6000.0),
              "var": np.full(6, 1 / 64 - float(np.float32(1e-5)))}
    b.bn(y, 6, name="bn", out="y", params=params)
    b.output("y")
    model = b.build()
    feeds = _image_feeds(model)
    folded, report = fold_checked(model, feeds, dtype="fp16")
    assert len(report.folded) == 1
    for f in feeds:
        assert np.all(np.isfinite(run_model(folded, f)["y"]))


def fp16_bn_matmul(*, layer: str) -> onnx.ModelProto:
    """x[batch, 4] (0..255) -> BN(s = 1, t = -128) -> MatMul(W = 100) + Add | Gemm -> y: the
    original's MatMul output is at most 51200; W*x, which the forward fold computes
    before adding W*t, reaches 102000: inf in fp16."""
    b = GraphBuilder("fp16", seed=0)
    x = b.input("x", ["batch", 4])
    params = {"scale": np.ones(4), "bias": np.zeros(4), "mean": np.full(4, 128.0),
              "var": np.full(4, 1 - float(np.float32(1e-5)))}
    y = b.bn(x, 4, name="bn", params=params)
    w = b.const("W", np.full((4, 6), 100, np.float16))
    bias = b.const("B", np.full(6, 1, np.float16))
    if layer == "Gemm":
        b.node("Gemm", [y, w, bias], name="layer", outputs=["y"])
    else:
        y = b.node("MatMul", [y, w], name="layer")
        b.node("Add", [y, bias], name="add", outputs=["y"])
    b.output("y")
    return b.build()


def test_fp16_forward_fold_into_matmul_with_a_shift_is_refused():
    model = fp16_bn_matmul(layer="MatMul")
    feeds = _image_feeds(model)
    for f in feeds:
        assert np.all(np.isfinite(run_model(model, f)["y"]))
    folded, report = fold_checked(model, feeds, dtype="fp16")
    assert "float16: layer's output would hold W(s*x)" in kept_reason(report)


def test_fp16_forward_fold_into_gemm_adds_the_shift_inside_the_kernel():
    model = fp16_bn_matmul(layer="Gemm")
    feeds = _image_feeds(model)
    folded, report = fold_checked(model, feeds, dtype="fp16")
    assert len(report.folded) == 1
    for f in feeds:
        assert np.all(np.isfinite(run_model(folded, f)["y"]))
