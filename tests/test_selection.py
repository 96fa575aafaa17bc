"""Selecting layers in real exports: by position ('#2', as inspect numbers them), errors that
name the forms that exist, --axis for insert, and a warning for a batch norm with one channel."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import bnfold
from bnfold.cli import main
from tests.builders import GraphBuilder, conv_bn, count_ops, random_feeds, run_unoptimised

BN = "BatchNormalization"


def keras_like_mlp(rank3: bool = False, seq=1) -> onnx.ModelProto:
    """Keras 3 names: x -> /MatMul (+/Add) -> Relu -> /MatMul_1 (+/Add_1) -> y. `rank3`:
    x is [batch, seq, 5], as the tutorial's Dense on a [batch, 1, 5] input."""
    b = GraphBuilder(seed=3)
    x = b.input("x", ["batch", seq, 5] if rank3 else ["batch", 5])
    h = b.node("MatMul", [x, b.weight("W0", [5, 16])], name="/MatMul")
    h = b.node("Add", [h, b.weight("B0", [16], fan_in=1)], name="/Add")
    h = b.node("Relu", [h], name="/Relu")
    h = b.node("MatMul", [h, b.weight("W1", [16, 4])], name="/MatMul_1")
    b.node("Add", [h, b.weight("B1", [4], fan_in=1)], name="/Add_1", outputs=["y"])
    b.output("y")
    return b.build()


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_after_position_selects_that_layer_in_graph_order():
    model = keras_like_mlp()
    _, report = bnfold.insert(model, after=["#2"])
    assert [i.layer for i in report.insertions] == ["/MatMul_1"]
    _, both = bnfold.insert(model, after=["#1", "#2"])
    assert [i.layer for i in both.insertions] == ["/MatMul", "/MatMul_1"]


def test_positions_are_the_ones_inspect_shows(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(keras_like_mlp(), str(path))
    listed = run("inspect", path, "--json", "-")
    rows = {row["position"]: row["name"] for row in json.loads(listed.stdout)["layers"]}
    assert rows == {1: "/MatMul", 2: "/MatMul_1"}
    table = run("inspect", path).stdout.splitlines()
    assert table[2].split()[:2] == ["#1", "/MatMul"]
    assert table[3].split()[:2] == ["#2", "/MatMul_1"]
    done = run("insert", path, "-o", tmp_path / "bn.onnx", "--after", "#2", "--json", "-")
    assert done.exit_code == 0, done.output
    assert [i["layer"] for i in json.loads(done.stdout)["insertions"]] == [rows[2]]


@pytest.mark.parametrize("pattern", ["dense_2", "#0", "#3", "#x"])
def test_a_selection_that_matches_nothing_names_the_forms_that_exist(pattern, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(keras_like_mlp(), str(path))
    result = run("insert", path, "-o", tmp_path / "bn.onnx", "--after", pattern)
    assert result.exit_code == 2
    assert result.stderr == (
        f"bnfold: error: no layer matches '{pattern}'; layers: /MatMul, /MatMul_1 (select by "
        f"name, a glob ('/MatMul*'), or position in graph order: '#1' to '#2', as `bnfold "
        f"inspect` numbers them)\n")


def bn_on_axis(y: np.ndarray, axis: int, gamma, beta, mean, var, eps) -> np.ndarray:
    shape = [1] * y.ndim
    shape[axis] = -1
    p = [np.asarray(v, np.float64).reshape(shape) for v in (gamma, beta, mean, var)]
    return (y - p[2]) / np.sqrt(p[3] + eps) * p[0] + p[1]


def test_axis_1_on_a_rank_3_dense_output_normalises_that_axis_and_warns_of_one_channel():
    model = keras_like_mlp(rank3=True)
    values = dict(gamma=1.5, beta=0.25, mean=0.1, var=2.0)
    inserted, report = bnfold.insert(model, after=["#1"], axis=1, before_activation=True,
                                     **values)
    (insertion,) = report.insertions
    assert insertion.axis == 1 and insertion.channels == 1 and insertion.transpose is None
    assert count_ops(inserted)[BN] == 1 and count_ops(inserted)["Transpose"] == 0
    assert any("has one channel: axis 1 of /MatMul's output has size 1" in n
               for n in report.notes)
    assert "has one channel" in report.to_text()
    # The inserted BN (inference mode) against numpy on the first layer's output.
    probe = onnx.ModelProto()
    probe.CopyFrom(inserted)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(insertion.output,
                                                                 onnx.TensorProto.FLOAT, None))
    feeds = random_feeds(model)
    x = feeds["x"].astype(np.float64)
    w0, b0 = (onnx.numpy_helper.to_array(t) for t in model.graph.initializer[:2])
    expected = bn_on_axis(x @ w0 + b0, 1, eps=1e-3, **values)
    got = run_unoptimised(probe, feeds)[insertion.output]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_fold_warns_of_a_batch_norm_with_one_channel():
    model = keras_like_mlp(rank3=True)
    inserted, _ = bnfold.insert(model, after=["#1"], axis=1, gamma=1.5, beta=0.25, mean=0.1,
                                var=2.0, before_activation=True)
    _, report = bnfold.fold(inserted)
    (decision,) = report.decisions
    assert "one channel" in decision.note and "(note: one channel" in report.to_text()
    folded, report = bnfold.fold(conv_bn(c_out=1))
    (decision,) = report.decisions
    assert decision.action == "folded" and "one channel" in decision.note
    assert report.to_dict()["decisions"][0]["note"] == decision.note
    _, report = bnfold.fold(conv_bn(c_out=2))
    assert report.decisions[0].note is None


def test_axis_other_than_the_features_goes_through_a_transpose_pair_when_not_axis_1():
    model = keras_like_mlp(rank3=True, seq=7)
    inserted, report = bnfold.insert(model, after=["/MatMul"], axis=1, before_activation=True)
    (insertion,) = report.insertions
    assert (insertion.axis, insertion.channels, insertion.transpose) == (1, 7, None)
    _, default = bnfold.insert(model, after=["/MatMul"])
    assert (default.insertions[0].axis, default.insertions[0].channels) == (2, 16)
    assert default.insertions[0].transpose == [0, 2, 1]
    assert default.to_dict()["insertions"][0]["channels"] == 16


@pytest.mark.parametrize("axis, message", [
    (0, "axis 0 is the batch axis"),
    (3, "choose an axis from 1 to 2"),
    (-4, "choose an axis from 1 to 2"),
])
def test_a_bad_axis_is_bad_input(axis, message):
    with pytest.raises(bnfold.BadInput, match=message):
        bnfold.insert(keras_like_mlp(rank3=True), after=["#1"], axis=axis)


def test_an_axis_of_unknown_size_is_bad_input():
    with pytest.raises(bnfold.BadInput, match="the size of axis 1 is not known"):
        bnfold.insert(keras_like_mlp(rank3=True, seq="seq"), after=["#1"], axis=1)


def test_cli_axis(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(keras_like_mlp(rank3=True), str(path))
    result = run("insert", path, "-o", tmp_path / "bn.onnx", "--after", "#1", "--axis", "1")
    assert result.exit_code == 0, result.output
    assert "has one channel" in result.stderr
    assert "--axis N" in run("insert", "--help").stdout
