"""`bnfold inspect` and the Dense-layer finder behind it (bnfold.dense): which layers, their
feature counts, the activation and batch norms around them, and fold's verdict per batch norm."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto
from torch import nn

from builders import GraphBuilder
from bnfold.cli.inspect import inspect_command
from bnfold.dense import LAYER_OPS, find_layers
from bnfold.errors import BadInput
from bnfold.inspect import inspect


def summary(model: onnx.ModelProto, ops=("Gemm", "MatMul")) -> list[tuple]:
    return [(l.name, l.op, l.in_features, l.out_features, l.activation_op, l.batchnorm,
             l.batchnorm_before) for l in find_layers(model, ops)]


@pytest.fixture(scope="module")
def torch_mlp(tmp_path_factory) -> onnx.ModelProto:
    """Linear -> ReLU -> Linear -> BN -> Tanh -> Linear, exported by the TorchScript exporter."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.BatchNorm1d(4),
                           nn.Tanh(), nn.Linear(4, 2)).eval()
    with torch.no_grad():  # distinct values: the exporter merges equal initializers (Identity)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(module[3], name).copy_(torch.rand(4) + 0.5)
    path = tmp_path_factory.mktemp("torch") / "mlp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(3, 6),), str(path), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    return onnx.load(path)


def bn_after_relu_at_the_output() -> onnx.ModelProto:
    """x -> dense (Gemm) -> Relu -> BN -> y: the BN can go neither back (Relu) nor forward."""
    b = GraphBuilder(seed=1)
    x = b.input("x", ["batch", 6])
    h = b.node("Gemm", [x, b.weight("w", [6, 4]), b.weight("b", [4], fan_in=1)], name="dense")
    h = b.node("Relu", [h], name="relu")
    b.bn(h, 4, name="bn", out="y")
    b.output("y")
    return b.build()


# --------------------------------------------------------------------------- the report


def test_table_of_a_torch_export(torch_mlp):
    report = inspect(torch_mlp)
    assert summary(torch_mlp) == [
        ("/0/Gemm", "Gemm", 6, 8, "Relu", None, None),
        ("/2/Gemm", "Gemm", 8, 4, None, "/3/BatchNormalization", None),
        ("/5/Gemm", "Gemm", 4, 2, None, None, None),
    ]
    text = report.to_text().splitlines()
    assert text[0] == "layers: 3"
    assert text[1].split() == ["#", "layer", "op", "in", "out", "activation", "batch", "norm"]
    assert text[2].split() == ["#1", "/0/Gemm", "Gemm", "6", "8", "Relu", "-"]
    assert text[3].split() == ["#2", "/2/Gemm", "Gemm", "8", "4", "-", "after:",
                               "/3/BatchNormalization"]
    assert text[5] == "batch norms: 1"
    assert text[7].split() == ["/3/BatchNormalization", "BatchNormalization", "yes", "backward",
                               "into", "/2/Gemm"]


def test_a_batch_norm_that_cannot_fold_says_why():
    model = bn_after_relu_at_the_output()
    report = inspect(model)
    (decision,) = report.batchnorms
    assert decision.node == "bn" and decision.action == "kept"
    assert "not a linear layer" in decision.reason and "graph output" in decision.reason
    row = report.to_text().splitlines()[-1]
    assert row.split()[:3] == ["bn", "BatchNormalization", "no"]
    assert row.endswith(decision.reason)
    assert summary(model) == [("dense", "Gemm", 6, 4, "Relu", "bn", None)]


def test_json_has_layers_and_verdicts(torch_mlp):
    data = inspect(torch_mlp).to_dict()
    assert [row["name"] for row in data["layers"]] == ["/0/Gemm", "/2/Gemm", "/5/Gemm"]
    assert data["layers"][0] == {
        "position": 1, "name": "/0/Gemm", "op": "Gemm", "node": "/0/Gemm",
        "output": "/0/Gemm_output_0",
        "in_features": 6, "out_features": 8, "rank": 2, "bias": None, "activation": "Relu",
        "activation_node": "/1/Relu", "batchnorm": None, "batchnorm_before": None}
    (bn,) = data["batchnorms"]
    assert (bn["node"], bn["foldable"], bn["direction"], bn["into"]) == \
        ("/3/BatchNormalization", True, "backward", "/2/Gemm")
    json.dumps(data)


def test_inspect_does_not_mutate_the_model(torch_mlp):
    snapshot = torch_mlp.SerializeToString()
    inspect(torch_mlp)
    assert torch_mlp.SerializeToString() == snapshot


# --------------------------------------------------------------------------- the command


def test_cli_prints_the_table_and_writes_json(torch_mlp, tmp_path):
    path, json_path = tmp_path / "m.onnx", tmp_path / "r.json"
    onnx.save(torch_mlp, path)
    result = CliRunner().invoke(inspect_command, [str(path), "--json", str(json_path)])
    assert result.exit_code == 0, result.output
    assert result.output == inspect(torch_mlp).to_text() + "\n"
    written = json.loads(json_path.read_text())  # the report after the run's head (docs/JSON.md)
    expected = inspect(torch_mlp).to_dict()
    assert {k: written[k] for k in expected} == expected
    assert written["command"] == "inspect" and written["input"] == str(path)


def test_cli_json_on_stdout(torch_mlp, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(torch_mlp, path)
    result = CliRunner().invoke(inspect_command, [str(path), "--json", "-"])
    assert result.exit_code == 0
    assert json.loads(result.output)["layers"][2]["name"] == "/5/Gemm"


def test_cli_op_filter(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(convs(), path)
    result = CliRunner().invoke(inspect_command, [str(path), "--op", "Conv", "--json", "-"])
    assert [row["name"] for row in json.loads(result.output)["layers"]] == ["conv"]


@pytest.mark.parametrize("args, message", [
    (["missing.onnx"], "missing.onnx: no such file"),
    (["{model}", "--op", "Dense"], "unknown layer op Dense"),
])
def test_cli_errors_are_one_line_exit_2(torch_mlp, tmp_path, monkeypatch, args, message):
    path = tmp_path / "m.onnx"
    onnx.save(torch_mlp, path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(inspect_command, [a.format(model=path) for a in args])
    assert result.exit_code == 2
    assert result.output.startswith("bnfold: error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------- the finder


def convs() -> onnx.ModelProto:
    """Grouped Conv (W [6, 2, 3, 3], group 2) -> Relu -> grouped ConvTranspose (W [6, 2, 3, 3])."""
    b = GraphBuilder(seed=2)
    x = b.input("x", ["batch", 4, 9, 7])
    h = b.node("Conv", [x, b.weight("conv.W", [6, 2, 3, 3])], name="conv", kernel_shape=[3, 3],
               group=2)
    h = b.node("Relu", [h], name="relu")
    b.node("ConvTranspose", [h, b.weight("convt.W", [6, 2, 3, 3])], name="convt",
           kernel_shape=[3, 3], group=2, outputs=["y"])
    b.output("y")
    return b.build()


def test_conv_layers_only_when_asked_for():
    model = convs()
    assert summary(model) == []
    assert summary(model, LAYER_OPS) == [
        ("conv", "Conv", 4, 6, "Relu", None, None),
        ("convt", "ConvTranspose", 6, 4, None, None, None),  # W [C_in, M/group, k...]
    ]
    assert [l.rank for l in find_layers(model, LAYER_OPS)] == [4, 4]


def dense_variants() -> onnx.ModelProto:
    """MatMul layers as exporters write them, and MatMuls that are not Dense layers."""
    b = GraphBuilder(seed=3)
    x = b.input("x", ["batch", "seq", 6])
    # bias on the left, weight from a Constant node
    h = b.node("MatMul", [x, b.const("w1", np.ones((6, 4), np.float32), as_node=True)],
               name="left_bias")
    h = b.node("Add", [b.weight("b1", [4], fan_in=1), h], name="left_bias/add")
    # weight and bias through no-op Casts (Keras), MatMul -> Cast -> Add -> Cast -> Cast -> Relu
    w2 = b.node("Cast", [b.weight("w2", [4, 5])], name="w2/cast", to=TensorProto.FLOAT)
    h = b.node("MatMul", [h, w2], name="keras_dense")
    h = b.node("Cast", [h], name="cast_1", to=TensorProto.FLOAT)
    h = b.node("Add", [h, b.weight("b2", [1, 1, 5], fan_in=1)], name="keras_dense/add")
    h = b.node("Cast", [h], name="cast_2", to=TensorProto.FLOAT)
    h = b.node("Cast", [h], name="cast_3", to=TensorProto.FLOAT)
    h = b.node("Relu", [h], name="relu")
    # an Add of a constant varying along seq, not features: no bias
    h = b.node("MatMul", [h, b.weight("w3", [5, 3])], name="no_bias")
    h = b.node("Add", [h, b.weight("c3", [7, 1], fan_in=1)], name="seq_add")
    # a real Cast (float16 weight): not a constant float weight
    w4 = b.node("Cast", [b.weight("w4", [3, 2], dtype="fp16")], name="w4/cast",
                to=TensorProto.FLOAT)
    h = b.node("MatMul", [h, w4], name="fp16_weight")
    # x @ x^T: no constant weight
    t = b.node("Transpose", [h], name="t", perm=[0, 2, 1])
    b.node("MatMul", [h, t], name="attention", outputs=["y"])
    b.output("y")
    return b.build()


def test_matmul_layers_as_exported():
    model = dense_variants()
    layers = {l.name: l for l in find_layers(model)}
    assert sorted(layers) == ["keras_dense", "left_bias", "no_bias"]
    assert (layers["left_bias"].bias, layers["left_bias"].output) == \
        ("left_bias/add", "left_bias/add_out")
    assert (layers["keras_dense"].bias, layers["keras_dense"].activation_op) == \
        ("keras_dense/add", "Relu")
    assert (layers["no_bias"].bias, layers["no_bias"].output) == (None, "no_bias_out")
    assert [(l.in_features, l.out_features, l.rank) for l in layers.values()] == \
        [(6, 4, 3), (4, 5, 3), (5, 3, 3)]


def test_activation_needs_to_be_the_only_reader():
    b = GraphBuilder()
    x = b.input("x", ["batch", 6])
    h = b.node("Gemm", [x, b.weight("w", [6, 4])], name="dense")
    r = b.node("Relu", [h], name="relu")
    b.node("Add", [h, r], name="skip", outputs=["y"])
    b.output("y")
    (layer,) = find_layers(b.build())
    assert layer.activation is None


def test_batch_norm_before_a_layer():
    b = GraphBuilder()
    x = b.input("x", ["batch", 6])
    h = b.bn(x, 6, name="bn")
    b.node("Gemm", [h, b.weight("w", [6, 4])], name="dense", outputs=["y"])
    b.output("y")
    assert summary(b.build()) == [("dense", "Gemm", 6, 4, None, None, "bn")]


def test_unnamed_layers_are_named_by_weight_then_output():
    b = GraphBuilder()
    x = b.input("x", ["batch", 6])
    w = b.weight("shared.W", [6, 6])
    h = b.node("MatMul", [x, w], name="", outputs=["first"])
    h = b.node("MatMul", [h, w], name="", outputs=["second"])
    b.node("Gemm", [h, b.weight("g.W", [6, 3])], name="", outputs=["y"])
    b.output("y")
    assert [l.name for l in find_layers(b.build())] == ["first", "second", "g.W"]


def test_unknown_op_is_bad_input():
    with pytest.raises(BadInput, match="unknown layer op Linear: choose from Gemm, MatMul"):
        find_layers(convs(), ("Linear",))
