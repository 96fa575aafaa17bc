"""The Python API takes a path wherever it takes a model: fold, insert, inspect (as verify
does), raising the documented BadInput for anything else."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import bnfold
from tests.builders import assert_equivalent, conv_bn, keras_mlp, random_feeds

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path):
    model = conv_bn()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return model, path


@pytest.mark.parametrize("kind", [str, Path])
def test_fold_takes_a_path(saved, kind):
    model, path = saved
    folded, report = bnfold.fold(kind(path))
    expected, expected_report = bnfold.fold(model)
    assert folded == expected and report.to_dict() == expected_report.to_dict()
    assert_equivalent(model, folded, random_feeds(model))


def test_fold_of_a_path_with_external_data_reads_it_beside_the_model(tmp_path, monkeypatch):
    model = conv_bn()
    path = tmp_path / "sub" / "ext.onnx"
    path.parent.mkdir()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    monkeypatch.chdir(tmp_path)  # not the model's folder
    folded, report = bnfold.fold(str(path))
    assert len(report.folded) == 1
    written = tmp_path / "folded.onnx"
    bnfold.save(folded, str(written), base_dir=str(path.parent))
    assert bnfold.verify(str(path), str(written)).passed


def test_insert_takes_a_path(tmp_path):
    model = keras_mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    from_path, report = bnfold.insert(str(path), all_layers=True)
    from_model, _ = bnfold.insert(model, all_layers=True)
    assert from_path == from_model and report.insertions


def test_inspect_takes_a_path(saved):
    model, path = saved
    assert bnfold.inspect(path).to_dict() == bnfold.inspect(model).to_dict()


@pytest.mark.parametrize("call", [bnfold.fold, bnfold.inspect,
                                  lambda m: bnfold.insert(m, all_layers=True)],
                         ids=["fold", "inspect", "insert"])
@pytest.mark.parametrize("given, message", [
    (42, "expected an onnx.ModelProto or a path to a model, not int"),
    (b"model.onnx", "not bytes"),
    ("missing.onnx", "missing.onnx: no such file"),
])
def test_anything_else_is_bad_input(call, given, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(bnfold.BadInput, match=message):
        call(given)


def test_a_given_model_is_not_modified_but_a_loaded_one_is_not_copied(saved):
    model, path = saved
    before = model.SerializeToString()
    bnfold.fold(model)
    assert model.SerializeToString() == before
    folded, _ = bnfold.fold(path)
    assert not np.any([n.op_type == "BatchNormalization" for n in folded.graph.node])
