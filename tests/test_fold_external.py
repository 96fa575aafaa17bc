"""Folding a model whose weights stay on disk: new weights are spilled to disk as they are made
(memory holds one layer at a time) and `save` streams them into the output's data file."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

import bnfold
from bnfold.fold import fold
from builders import assert_equivalent, random_feeds, trained_bn_params


def conv_bn_model(rng: np.random.Generator) -> onnx.ModelProto:
    params = trained_bn_params(16, rng)
    inits = [numpy_helper.from_array(rng.normal(size=(16, 8, 3, 3)).astype(np.float32), "W")]
    inits += [numpy_helper.from_array(v.astype(np.float32), f"bn.{k}") for k, v in params.items()]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean",
                                                     "bn.var"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 8, 5, 5])],
                              [helper.make_tensor_value_info("y", 1, ["N", 16, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def digest(directory) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(directory))}


def test_lazy_external_model_folds_with_spilled_weights(tmp_path):
    source, target = tmp_path / "in", tmp_path / "out"
    source.mkdir(), target.mkdir()
    original = conv_bn_model(np.random.default_rng(0))
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(original)  # onnx.save turns the tensors it writes out into references
    onnx.save(on_disk, source / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)
    before = digest(source)

    lazy = bnfold.load(source / "m.onnx")
    folded, report = fold(lazy, base_dir=str(source), inplace=True)

    assert [d.into for d in report.folded] == ["conv"]
    weight = next(t for t in folded.graph.initializer if t.name == "W")
    location = dict((e.key, e.value) for e in weight.external_data)["location"]
    assert weight.data_location == onnx.TensorProto.EXTERNAL and not weight.raw_data
    assert not location.startswith(str(source))  # spilled, never written beside the input
    bnfold.save(folded, target / "f.onnx", base_dir=str(source), external_data=True)
    assert digest(source) == before
    assert sorted(os.listdir(target)) == ["f.onnx", "f.onnx.data"]
    result = onnx.load(target / "f.onnx")
    onnx.checker.check_model(result, full_check=True)
    assert sum(n.op_type == "BatchNormalization" for n in result.graph.node) == 0
    assert_equivalent(original, result, random_feeds(original), "fp32")


def test_spilled_weights_are_read_back_by_later_folds(tmp_path):
    # MatMul + Add(bias) -> BN -> Mul: the BN folds into the layer first, spilling its bias; the
    # Mul then folds into the same layer and must read the spilled bias back.
    rng = np.random.default_rng(1)
    params = trained_bn_params(300, rng)
    inits = [numpy_helper.from_array(rng.normal(size=(5, 300)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=300).astype(np.float32), "b"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 300).astype(np.float32), "k")]
    inits += [numpy_helper.from_array(v.astype(np.float32), f"bn.{k}") for k, v in params.items()]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="dense"),
             helper.make_node("Add", ["m", "b"], ["a"], name="bias"),
             helper.make_node("BatchNormalization", ["a", "bn.scale", "bn.bias", "bn.mean",
                                                     "bn.var"], ["n"], name="bn"),
             helper.make_node("Mul", ["n", "k"], ["y"], name="scale")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 5])],
                              [helper.make_tensor_value_info("y", 1, ["N", 300])], inits)
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(original)
    onnx.save(on_disk, tmp_path / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)

    folded, report = fold(bnfold.load(tmp_path / "m.onnx"), base_dir=str(tmp_path), inplace=True)

    assert [(d.node, d.into) for d in report.folded] == [("bn", "dense"), ("scale", "dense")]
    bnfold.save(folded, tmp_path / "f.onnx", base_dir=str(tmp_path))
    result = onnx.load(tmp_path / "f.onnx")
    assert [n.op_type for n in result.graph.node] == ["MatMul", "Add"]
    assert_equivalent(original, result, random_feeds(original), "fp32")
