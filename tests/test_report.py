"""The fold report at a glance: before -> after table, decisions in graph order, every other
node the pass removed, and one line when nothing was folded."""

from __future__ import annotations

import glob
import json
import os

import onnx
import pytest
from click.testing import CliRunner

import bnfold
from bnfold.cli import main
from tests.builders import GraphBuilder, conv_bn, conv_bn_relu_bn_conv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_table_counts_nodes_by_op_bn_casts_parameters_and_file_size(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn(), str(path))
    result = run("fold", path, "-o", tmp_path / "f.onnx", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["before"]["ops"] == {"BatchNormalization": 1, "Conv": 1}
    assert report["after"]["ops"] == {"Conv": 1}
    assert report["before"]["parameters"] == 6 * 4 * 9 + 6 + 4 * 6
    assert report["after"]["parameters"] == 6 * 4 * 9 + 6
    assert report["before"]["size"] == os.path.getsize(path)
    assert report["after"]["size"] == os.path.getsize(tmp_path / "f.onnx")
    lines = result.stderr.splitlines()
    table = lines[lines.index(next(l for l in lines if l.split() == ["before", "->", "after"])):]
    assert table[1].split() == ["nodes", "2", "->", "1"]
    assert table[2].split() == ["BatchNormalization", "1", "->", "0"]
    assert table[3].split() == ["parameters", "246", "->", "222"]
    assert table[4].split()[:2] == ["file", "size"] and "kB" in table[4]


def test_dry_run_table_has_no_output_size(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn(), str(path))
    result = run("fold", path, "--dry-run", "--json", "-")
    report = json.loads(result.stdout)
    assert report["before"]["size"] == os.path.getsize(path) and report["after"]["size"] is None
    assert "file size" not in result.stderr


def test_decisions_are_in_graph_order():
    # bn1 (training mode) is kept, bn2 folds: the pass decides bn2 first.
    _, report = bnfold.fold(conv_bn_relu_bn_conv(first_bn_training=True))
    assert [(d.node, d.action) for d in report.decisions] == [("bn1", "kept"), ("bn2", "folded")]
    text = report.to_text().splitlines()
    assert text[0].startswith("kept     bn1") and text[1].startswith("folded   bn2")


def cast_constant_model() -> onnx.ModelProto:
    """x -> Cast(float->float) -> Conv -> BN with Constant-node parameters -> y."""
    b = GraphBuilder()
    x = b.input("x", ["batch", 4, 9, 7])
    x = b.node("Cast", [x], name="noop_cast", to=onnx.TensorProto.FLOAT)
    y = b.node("Conv", [x, b.weight("W", [6, 4, 3, 3])], name="conv", kernel_shape=[3, 3])
    b.bn(y, 6, name="bn", out="y", source="constant")
    b.output("y")
    return b.build()


def test_every_removed_non_bn_node_is_listed_grouped_in_text_in_full_in_json():
    _, report = bnfold.fold(cast_constant_model())
    removed = [(r.op, r.name, r.why) for r in report.removed]
    assert removed == [("Cast", "noop_cast", "no-op")] + [
        ("Constant", f"bn_{k}_const", "unused after folding") for k in ("scale", "bias", "mean",
                                                                        "var")]
    assert "removed 5 other nodes: 4 Constant (unused after folding), 1 Cast (no-op)" in \
        report.to_text().splitlines()
    assert report.to_dict()["removed"][0] == {"op": "Cast", "name": "noop_cast", "graph": "main",
                                              "why": "no-op"}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "models", "*.onnx"))),
                         ids=os.path.basename)
def test_every_node_that_goes_is_a_batch_norm_or_listed_as_removed(path):
    model = onnx.load(path)
    folded, report = bnfold.fold(model)
    gone = {n.name for n in model.graph.node} - {n.name for n in folded.graph.node}
    batch_norms = {name for d in report.folded for name in d.nodes}
    assert batch_norms and gone == batch_norms | {r.name for r in report.removed}
    assert not batch_norms & {r.name for r in report.removed}


def test_nothing_to_fold_says_why_in_one_line(tmp_path):
    b = GraphBuilder()
    b.node("Relu", [b.input("x", ["batch", 4])], name="relu", outputs=["y"])
    b.output("y")
    model = b.build()
    _, report = bnfold.fold(model)
    assert report.why_unchanged() == "nothing to fold: no batch norm in the model"
    assert report.to_text().splitlines().count(report.why_unchanged()) == 1
    model.producer_name = "pytorch"
    _, report = bnfold.fold(model)
    assert "torch's exporter already fuses Conv+BN" in report.to_dict()["why_unchanged"]


def test_nothing_folded_when_every_batch_norm_is_kept():
    _, report = bnfold.fold(conv_bn(training_mode=1, opset=15, n_outputs=3))
    assert report.why_unchanged() == "nothing to fold: every batch norm kept"
    _, folded = bnfold.fold(conv_bn())
    assert folded.why_unchanged() is None and folded.to_dict()["why_unchanged"] is None
