"""Refusals: every BN that cannot be folded exactly stays, with a reason, and the model still
computes the same outputs.

Reasons are asserted by the substrings listed in docs/API.md ("Refusal reasons"). Every test goes
through `fold_checked` (input not mutated, onnx.checker, interface, one decision per BN, outputs
equal to the unoptimised original in onnxruntime).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from builders import (
    act_bn_tail,
    bn_conv,
    bn_gemm,
    bn_gemm_trans_a,
    bn_matmul3d,
    conv_bn,
    conv_bn_per_activation,
    conv_bn_relu_bn_conv,
    conv_bn_shared_output,
    count_ops,
    find_node,
    fold_checked,
    kept_reason,
    matmul3d_bn_on_seq,
    random_feeds,
    run_model,
    tensor_value,
    trained_bn_params,
)


def assert_kept(model, reason: str, **options):
    """Fold `model`; its one BN must stay, with `reason` in the report. Returns the result."""
    folded, report = fold_checked(model, **options)
    why = kept_reason(report)
    assert reason in why, f"expected {reason!r} in the reason {why!r}"
    assert count_ops(folded) == count_ops(model), "a refused fold must not change the graph"
    return folded, report


# --- graph structure ----------------------------------------------------------------------


def test_producer_output_with_another_consumer_is_refused():
    assert_kept(conv_bn_shared_output(also="consumer"), "other consumers")


def test_producer_output_that_is_a_graph_output_is_refused():
    assert_kept(conv_bn_shared_output(also="output"), "graph output")


def test_bn_output_that_is_also_a_graph_output_is_not_folded_forward():
    assert_kept(bn_gemm(expose_bn=True), "graph output")


def test_bn_between_activation_and_softmax_has_no_linear_layer():
    _, report = assert_kept(act_bn_tail(act="Relu", tail="Softmax"), "not a linear layer")
    assert report.kept[0].reason.startswith("backward: ")
    assert "; forward: " in report.kept[0].reason


def test_standalone_bn_between_graph_input_and_output_is_kept_with_both_directions():
    _, report = assert_kept(act_bn_tail(act=None, tail=None), "backward: ")
    assert "; forward: " in report.kept[0].reason


# --- constants ----------------------------------------------------------------------------


def test_weight_that_is_a_graph_input_is_not_constant():
    assert_kept(conv_bn(weights="input"), "not constant")


@pytest.mark.parametrize("key", ["scale", "bias", "mean", "var"])
def test_bn_parameter_that_is_a_graph_input_is_not_constant(key):
    assert_kept(conv_bn(bn_params=f"input:{key}"), "not constant")


@pytest.mark.parametrize("source", ["weights", "bn_params"])
def test_initializer_listed_as_graph_input_is_refused_by_default(source):
    """IR >= 4: an initializer that is also a graph input can be overridden by the caller."""
    model = conv_bn(**{source: "listed" if source == "weights" else "listed:scale"})
    assert model.ir_version >= 4
    assert_kept(model, "graph input")


@pytest.mark.parametrize("source", ["weights", "bn_params"])
def test_initializer_listed_as_graph_input_folds_when_allowed(source):
    model = conv_bn(**{source: "listed" if source == "weights" else "listed:scale"})
    folded, report = fold_checked(model, allow_initializer_inputs=True)
    assert len(report.folded) == 1 and not report.kept
    assert count_ops(folded) == Counter(Conv=1)


# --- training mode ------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [14, 15])
def test_training_mode_bn_is_refused(opset):
    model = conv_bn(opset=opset, training_mode=1, n_outputs=3)
    assert_kept(model, "training mode")


@pytest.mark.parametrize("opset", [14, 15])
def test_training_mode_bn_folds_when_converted_to_inference(opset):
    """Compared with the same model built in inference mode (running statistics)."""
    model = conv_bn(opset=opset, training_mode=1, n_outputs=3)
    inference = conv_bn(opset=opset)  # same seed: same weights and BN parameters
    folded, report = fold_checked(model, reference=inference, training_to_inference=True)
    assert len(report.folded) == 1 and report.folded[0].direction == "backward"
    assert count_ops(folded) == Counter(Conv=1)
    # The training-mode original really computes something else (batch statistics).
    feeds = random_feeds(model)
    assert not np.allclose(run_model(model, feeds)["y"], run_model(inference, feeds)["y"])


@pytest.mark.parametrize("opset", [14, 15])
def test_to_inference_mode_matches_a_model_built_in_inference_mode(opset):
    from bnfold.fold import to_inference_mode

    model = conv_bn(opset=opset, training_mode=1, n_outputs=3)
    snapshot = model.SerializeToString()
    converted = to_inference_mode(model)
    assert model.SerializeToString() == snapshot
    feeds = random_feeds(model)
    np.testing.assert_array_equal(run_model(converted, feeds)["y"],
                                  run_model(conv_bn(opset=opset), feeds)["y"])


@pytest.mark.parametrize("opset", [7, 9])
def test_bn_with_extra_outputs_used_is_refused(opset):
    """Opset <= 9: extra outputs (running/saved mean and var) mean training."""
    model = conv_bn(opset=opset, n_outputs=5, expose=("bn_out1",))  # running mean is used
    assert_kept(model, "training mode")


def test_opset7_spatial0_bn_is_refused():
    assert_kept(conv_bn_per_activation(), "spatial=0")


# --- axes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [None, "right"], ids=["matmul", "matmul_add"])
def test_rank3_matmul_bn_on_sequence_axis_is_refused(bias):
    """MatMul gives [B, T, N]; BN's axis 1 is T, not the feature axis N."""
    assert_kept(matmul3d_bn_on_seq(bias=bias), "feature axis")


def test_forward_into_rank3_matmul_on_sequence_axis_is_refused():
    assert_kept(bn_matmul3d(), "feature axis")


def test_forward_into_gemm_with_trans_a_is_refused():
    """With transA=1, axis 1 of A is Gemm's M axis, not the K features B' contracts."""
    assert_kept(bn_gemm_trans_a(), "feature axis")


# --- padding ------------------------------------------------------------------------------


@pytest.mark.parametrize("pads,auto_pad", [(1, None), (0, "SAME_UPPER"), (0, "SAME_LOWER")],
                         ids=["pads1", "same_upper", "same_lower"])
def test_forward_into_padded_conv_with_a_shift_is_refused(pads, auto_pad):
    """Padded zeros never received the BN shift t: folding it into the bias would be wrong."""
    assert_kept(bn_conv(pads=pads, auto_pad=auto_pad), "padding")


def test_forward_into_padded_conv_without_shift_folds():
    folded, report = fold_checked(bn_conv(pads=1, zero_shift=True))
    assert len(report.folded) == 1 and report.folded[0].direction == "forward"
    assert count_ops(folded) == Counter(Conv=1, Relu=1)


# --- arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad_var", [-0.5, "-eps"], ids=["negative", "minus_epsilon"])
def test_var_plus_eps_not_positive_is_refused(bad_var):
    params = trained_bn_params(6, np.random.default_rng(1))
    epsilon = np.float32(1e-5)
    params["var"][2] = -float(epsilon) if bad_var == "-eps" else bad_var
    assert_kept(conv_bn(bn_values=params, epsilon=float(epsilon)), "var + eps <= 0")


@pytest.mark.parametrize("key,value", [("mean", np.inf), ("scale", np.nan), ("bias", -np.inf)])
def test_non_finite_result_is_refused(key, value):
    params = trained_bn_params(6, np.random.default_rng(2))
    params[key][1] = value
    assert_kept(conv_bn(bn_values=params), "not finite")


def test_fp16_weight_overflow_is_refused():
    """gamma 2e4 and var 1e-4 give s near 2e6: the scaled weights exceed fp16's 65504."""
    params = trained_bn_params(6, np.random.default_rng(3))
    params["scale"][4] = 2e4
    params["var"][4] = 1e-4
    model = conv_bn(dtype="fp16", bn_values=params)
    w = tensor_value(model, "conv_W").astype(np.float64)
    assert np.max(np.abs(w[4])) * 2e4 / np.sqrt(1e-4 + 1e-5) > 65504  # the premise
    folded, _ = assert_kept(model, "overflows", dtype="fp16")
    np.testing.assert_array_equal(tensor_value(folded, find_node(folded, "Conv").input[1]),
                                  tensor_value(model, "conv_W"))


def test_a_refused_bn_does_not_block_the_others():
    """Conv -> BN(training) -> Relu -> BN -> Conv: the second BN still folds forward."""
    model = conv_bn_relu_bn_conv(first_bn_training=True)
    folded, report = fold_checked(model)
    assert [(d.node, d.direction, d.into) for d in report.folded] == [("bn2", "forward", "conv2")]
    assert [d.node for d in report.kept] == ["bn1"]
    assert "training mode" in report.kept[0].reason
    assert count_ops(folded) == Counter(Conv=2, Relu=1, BatchNormalization=1)
