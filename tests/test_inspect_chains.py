"""inspect's layer table names the decomposed batch norms (Sub/Mul/Add chains, as Keras 3
writes them) beside their layers, as it does BatchNormalization nodes."""

from __future__ import annotations

import os

import onnx

from bnfold.inspect import inspect
from tests.builders import GraphBuilder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(report):
    return [(layer.name, layer.batchnorm, layer.batchnorm_before) for layer in report.layers]


def test_keras_mlp_chain_after_a_dense_and_its_relu_and_before_the_next():
    report = inspect(onnx.load(os.path.join(ROOT, "models", "mlp_keras.onnx")))
    assert rows(report) == [("/MatMul", None, None), ("/MatMul_1", "/Sub", None),
                            ("/MatMul_2", None, "/Sub")]
    table = report.to_text().splitlines()
    assert table[3].split()[-2:] == ["after:", "/Sub"]
    assert table[4].split()[-2:] == ["before:", "/Sub"]
    assert report.to_dict()["layers"][1]["batchnorm"] == "/Sub"


def test_keras_cnn_chains_after_conv_through_transpose_and_bias_add():
    report = inspect(onnx.load(os.path.join(ROOT, "models", "cnn_keras.onnx")), ops=["Conv"])
    assert rows(report) == [("/Conv", "/Sub", None), ("/Conv_1", "/Sub_1", None)]


def test_a_chain_reading_a_constant_node_first_is_placed_by_its_varying_input():
    b = GraphBuilder(seed=2)
    x = b.input("x", ["batch", 4])
    h = b.node("Gemm", [x, b.weight("W", [4, 6]), b.weight("B", [6], fan_in=1)], name="dense")
    mean = b.const("mean", b.rng.standard_normal(6).astype("float32"), as_node=True)
    h = b.node("Sub", [h, mean], name="sub")
    h = b.node("Mul", [h, b.const("scale", b.rng.uniform(0.5, 2, 6).astype("float32"))],
               name="mul")
    b.node("Add", [h, b.const("shift", b.rng.standard_normal(6).astype("float32"))],
           name="add", outputs=["y"])
    b.output("y")
    report = inspect(b.build())
    assert [d.op for d in report.batchnorms] == ["affine"]
    assert rows(report) == [("dense", "sub", None)]
