"""Region checks: when no draw runs the whole model, each rewritten region is checked alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.cli import main
from bnfold.errors import BadInput
from bnfold.verify import random_inputs, verify

import builders
from builders import GraphBuilder

F, S = TensorProto.FLOAT, TensorProto.STRING


def conv_bn_with_a_parsed_string(*, branches: int = 1, seed: int = 0) -> onnx.ModelProto:
    """x -> Conv -> BN (per branch) -> + float(s): `s` is a string input that Cast parses, so
    onnxruntime fails on every drawn string ("s0" is no number) and the whole model never runs."""
    b = GraphBuilder(seed=seed, opset=17)
    x = b.input("x", ["batch", 4, 9, 7])
    s = b.input("s", [1], S)
    number = b.node("Cast", [s], name="parse", to=F)
    for i in range(branches):
        w = b.weight(f"conv{i}_W", [6, 4, 3, 3])
        bias = b.weight(f"conv{i}_B", [6], fan_in=1)
        c = b.node("Conv", [x, w, bias], name=f"conv{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        y = b.bn(c, 6, name=f"bn{i}")
        b.node("Add", [y, number], name=f"add{i}", outputs=[f"y{i}"])
        b.output(f"y{i}")
    return b.build()


def _perturbed(model: onnx.ModelProto, name_part: str, factor: float) -> onnx.ModelProto:
    """A copy with the first initializer whose name contains `name_part` scaled by `factor`."""
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    for i, t in enumerate(wrong.graph.initializer):
        if name_part in t.name:
            array = numpy_helper.to_array(t).copy()
            array.flat[0] *= factor
            wrong.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, t.name))
            return wrong
    raise AssertionError(f"no initializer named like {name_part}")


def _folded_weight_name(folded: onnx.ModelProto) -> str:
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    return conv.input[1]


def test_string_model_with_a_foldable_conv_bn_is_checked_by_region():
    model = conv_bn_with_a_parsed_string()
    folded, report = bnfold.fold(model)
    assert len(report.folded) == 1
    check = verify(model, folded)
    assert check.passed and check.method == "regions: 1", check.to_text()
    [region] = check.regions
    assert region.reference_nodes == ["conv0", "bn0"] and region.candidate_nodes == ["conv0"]
    assert region.inputs == ["x"] and [o.name for o in region.outputs] == ["bn0_out"]
    assert region.outputs[0].max_rel < 1e-4
    assert "the reference runs none of 4 draws" in check.notes[0] and "stod" in check.notes[0]
    assert "regions: 1" in check.to_text() and "region 1: conv0, bn0 -> conv0 ok" in check.to_text()
    data = check.to_dict()
    assert data["method"] == "regions: 1" and data["regions"][0]["passed"]


def test_a_wrong_fold_fails_its_region():
    model = conv_bn_with_a_parsed_string()
    folded, _ = bnfold.fold(model)
    wrong = _perturbed(folded, _folded_weight_name(folded), 1.01)
    check = verify(model, wrong)
    assert not check.passed and check.method == "regions: 1"
    assert [o.name for o in check.failures] == ["bn0_out"]


def test_separate_rewrites_are_separate_regions():
    model = conv_bn_with_a_parsed_string(branches=2)
    folded, report = bnfold.fold(model)
    check = verify(model, folded)
    assert check.passed and check.method == "regions: 2"
    assert [r.reference_nodes for r in check.regions] == [["conv0", "bn0"], ["conv1", "bn1"]]


def test_an_unchanged_model_that_cannot_run_has_no_region_to_check():
    model = conv_bn_with_a_parsed_string()
    check = verify(model, model)
    assert check.passed and check.method == "regions: 0" and not check.regions


def test_a_region_that_cannot_be_run_leaves_the_check_undone(tmp_path):
    """The region's input has a shape computed from the string (unknown to inference and drawn
    wrongly): the region cannot run, so verification cannot be done."""
    b = GraphBuilder(seed=0, opset=17)
    s = b.input("s", [4], S)
    flat = b.input("flat", [96])
    dims = b.node("Cast", [s], name="parse", to=TensorProto.INT64)
    x = b.node("Reshape", [flat, dims], name="reshape")
    c = b.node("Conv", [x, b.weight("conv_W", [6, 4, 1, 1])], name="conv", kernel_shape=[1, 1])
    b.bn(c, 6, name="bn", out="y")
    b.output("y", declared=helper.make_tensor_value_info("y", F, [None, 6, None, None]))
    model = b.build()
    folded, report = bnfold.fold(model)
    assert len(report.folded) == 1
    with pytest.raises(BadInput, match="verification cannot be done: the whole model cannot be "
                                       "run .*nor region 1 \\(conv, bn\\)"):
        verify(model, folded)
    onnx.save(model, tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["fold", str(tmp_path / "m.onnx"), "-o",
                                       str(tmp_path / "out.onnx")])
    assert result.exit_code == 2 and "verification cannot be done" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_region_check_through_the_cli(tmp_path):
    model = conv_bn_with_a_parsed_string()
    onnx.save(model, tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["fold", str(tmp_path / "m.onnx"), "-o",
                                       str(tmp_path / "out.onnx"), "--json", "-"])
    assert result.exit_code == 0, result.output
    verification = json.loads(result.stdout)["verification"]
    assert verification["method"] == "regions: 1" and verification["passed"]
    assert "verification passed (regions: 1)" in result.stderr
    folded = onnx.load(tmp_path / "out.onnx")
    onnx.save(_perturbed(folded, _folded_weight_name(folded), 1.01), tmp_path / "wrong.onnx")
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "m.onnx"),
                                       str(tmp_path / "wrong.onnx")])
    assert result.exit_code == 1 and "region 1" in result.stderr and "FAILED" in result.stderr


def _with_a_parsed_string(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` plus z = y + float(s): a string input no draw can parse."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.input.append(helper.make_tensor_value_info("s", S, [1]))
    model.graph.node.append(helper.make_node("Cast", ["s"], ["num"], to=F))
    model.graph.node.append(helper.make_node("Add", ["y", "num"], ["z"]))
    model.graph.output.append(helper.make_tensor_value_info("z", F, None))
    return model


@pytest.mark.parametrize("make", [builders.if_bn, lambda: builders.loop_bn(trips=6)],
                         ids=["if", "loop"])
def test_a_node_whose_body_was_folded_is_a_region(make):
    """An If/Loop whose bodies were folded is checked as a region, with the outer values its
    bodies read (weights, BN parameters) inside; an If's condition takes both branches."""
    model = _with_a_parsed_string(make())
    folded, report = bnfold.fold(model)
    assert report.folded
    check = verify(model, folded)
    assert check.passed and check.method == "regions: 1"
    [region] = check.regions
    assert region.reference_nodes == region.candidate_nodes == [model.graph.node[0].name]
    if "cond" in region.inputs:
        feeds = [random_inputs(region_model, draw=d)["cond"] for d in (0, 1)
                 for region_model in [_region_reference(model, folded)]]
        assert [bool(f) for f in feeds] == [True, False]
    wrong = onnx.ModelProto.FromString(folded.SerializeToString())
    body = wrong.graph.node[0].attribute[0].g
    conv = next(n for n in body.node if n.op_type == "Conv")
    weight = next(t for g in (body, wrong.graph) for t in g.initializer if t.name == conv.input[1])
    array = numpy_helper.to_array(weight) * np.float32(1.001)  # 1e-3 relative, everywhere
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    assert not verify(model, wrong).passed


def _region_reference(model, folded):
    from bnfold.verify.regions import _cut, _boundary, _Side, regions
    ref, cand = _Side(model, None), _Side(folded, None)
    [(ref_nodes, cand_nodes)] = regions(ref, cand)
    inputs, outputs = _boundary(ref, cand, ref_nodes, cand_nodes)
    return _cut(ref, ref_nodes, inputs, outputs, ref)


def test_region_check_of_an_ir3_model():
    model = conv_bn_with_a_parsed_string()
    model.ir_version = 3
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    folded, report = bnfold.fold(model)
    assert len(report.folded) == 1
    check = verify(model, folded)
    assert check.passed and check.method == "regions: 1"
