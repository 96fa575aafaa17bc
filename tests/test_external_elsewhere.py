"""Tensors in external data outside the main graph's dense initializers: a sparse initializer's
values (onnx and onnxruntime accept them) and a training_info graph's tensors (onnxruntime
ignores them, so the check cannot see them). bnfold must read, check, fold and write such a
model like any other: the data file found next to the model, whatever the working directory;
its bytes carried into the output's data file; a location outside the model's folder
refused. And a sparse initializer's name is taken: no new tensor gets it, and in a
subgraph it shadows the outer value of that name."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bnfold.cli import main
from bnfold.errors import BadInput
from bnfold.io import load
from builders import trained_bn_params

SPARSE = np.arange(1, 301, dtype=np.float32) / 7  # the sparse initializer's 300 values


def move_to_file(t: onnx.TensorProto, data_file, location: str) -> None:
    """Append `t`'s raw bytes to `data_file` and make `t` read them there, as `location`."""
    offset = os.path.getsize(data_file) if os.path.exists(data_file) else 0
    length = len(t.raw_data)
    with open(data_file, "ab") as f:
        f.write(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)


def sparse_model(directory, location: str = "sparse.bin"):
    """Conv -> BN -> y, and s = Identity(S), S a sparse [600] initializer whose values are in
    the file `location` (relative to `directory`, where the model is written)."""
    rng = np.random.default_rng(0)
    params = trained_bn_params(4, rng)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W")]
    inits += [numpy_helper.from_array(v.astype(np.float32), f"bn.{k}") for k, v in params.items()]
    os.makedirs(directory, exist_ok=True)
    data = os.path.normpath(os.path.join(directory, location))
    os.makedirs(os.path.dirname(data), exist_ok=True)
    values = numpy_helper.from_array(SPARSE, "S")
    move_to_file(values, data, location)
    indices = numpy_helper.from_array(np.arange(0, 600, 2, dtype=np.int64), "S_indices")
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean",
                                                     "bn.var"], ["y"], name="bn"),
             helper.make_node("Identity", ["S"], ["s"], name="sparse_out")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [600])], inits,
        sparse_initializer=[helper.make_sparse_tensor(values, indices, [600])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = os.path.join(directory, "model.onnx")
    onnx.save(model, path)
    if not location.startswith(".."):
        onnx.checker.check_model(path)  # valid, by onnx's own reading
    return path


def sparse_output(path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["s"], {"x": np.ones((1, 3, 6, 6), np.float32)})[0]


def digest(directory) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(directory))}


def test_the_data_file_is_found_next_to_the_model_from_any_working_directory(tmp_path,
                                                                             monkeypatch):
    path = sparse_model(tmp_path / "in")
    monkeypatch.chdir(tmp_path)  # not the model's folder: a relative location is the model's
    model = load(path)
    assert model.graph.sparse_initializer[0].values.data_location == TensorProto.EXTERNAL


def test_fold_into_another_folder_carries_the_sparse_values_into_the_output(tmp_path,
                                                                            monkeypatch):
    path = sparse_model(tmp_path / "in")
    before = digest(tmp_path / "in")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "model.onnx"
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["fold", path, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "verification passed" in result.output
    assert digest(tmp_path / "in") == before  # the input and its data file as they were
    written = onnx.load(str(out), load_external_data=False)
    assert [n.op_type for n in written.graph.node] == ["Conv", "Identity"]
    values = written.graph.sparse_initializer[0].values
    location = next(e.value for e in values.external_data if e.key == "location")
    assert not os.path.isabs(location) and os.path.exists(out.parent / location)
    expected = np.zeros(600, np.float32)
    expected[::2] = SPARSE
    np.testing.assert_array_equal(sparse_output(out), expected)


def test_fold_in_place_keeps_the_sparse_values_readable(tmp_path):
    path = sparse_model(tmp_path / "in")
    expected = sparse_output(path)
    result = CliRunner().invoke(main, ["fold", path, "--in-place"])
    assert result.exit_code == 0, result.output
    assert [n.op_type for n in onnx.load(path, load_external_data=False).graph.node] == \
        ["Conv", "Identity"]
    np.testing.assert_array_equal(sparse_output(path), expected)


def test_a_sparse_location_outside_the_models_folder_is_bad_input(tmp_path):
    path = sparse_model(tmp_path / "in", location="../sparse.bin")
    with pytest.raises(BadInput, match="is not inside the model's directory"):
        load(path, check=False)
    result = CliRunner().invoke(main, ["fold", path, "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 2
    assert not (tmp_path / "out.onnx").exists()


def test_the_report_counts_a_sparse_initializers_stored_values_as_parameters(tmp_path):
    from bnfold.fold import fold

    path = sparse_model(tmp_path / "in")
    _, report = fold(load(path), base_dir=str(tmp_path / "in"))
    dense = 4 * 3 * 3 * 3 + 4 * 4  # W, and the BN's four parameters
    assert report.before.parameters == dense + len(SPARSE)
    assert report.after.parameters == 4 * 3 * 3 * 3 + 4 + len(SPARSE)  # W', and its new bias


def test_a_training_info_tensor_in_external_data_is_carried_into_the_output(tmp_path):
    path = sparse_model(tmp_path / "in")
    model = onnx.load(path, load_external_data=False)
    lr = numpy_helper.from_array(np.linspace(0, 1, 500, dtype=np.float32), "lr")
    move_to_file(lr, tmp_path / "in" / "lr.bin", "lr.bin")
    info = model.training_info.add()
    info.initialization.CopyFrom(helper.make_graph(
        [helper.make_node("Constant", [], ["rate"], value=lr)], "init", [],
        [helper.make_tensor_value_info("rate", TensorProto.FLOAT, [500])]))
    onnx.save(model, path)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "model.onnx"
    result = CliRunner().invoke(main, ["fold", path, "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = onnx.load(str(out), load_external_data=False)
    tensor = written.training_info[0].initialization.node[0].attribute[0].t
    np.testing.assert_array_equal(numpy_helper.to_array(tensor, str(out.parent)),
                                  np.linspace(0, 1, 500, dtype=np.float32))


def test_a_new_tensor_is_not_named_like_an_unused_sparse_initializer():
    """The fold's new bias for a Conv without one is named conv/bias unless that name is taken,
    by a sparse initializer too (the same name twice is an invalid model)."""
    from bnfold.fold import fold

    rng = np.random.default_rng(0)
    params = trained_bn_params(4, rng)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W")]
    inits += [numpy_helper.from_array(v.astype(np.float32), f"bn.{k}") for k, v in params.items()]
    unused = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(2, np.float32), "conv/bias"),
                                       numpy_helper.from_array(np.array([0, 3]), "at"), [4])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
         helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean",
                                                 "bn.var"], ["y"], name="bn")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits,
        sparse_initializer=[unused])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    folded, report = fold(model)
    assert [d.action for d in report.decisions] == ["folded"]
    onnx.checker.check_model(folded)  # names unique across initializers and sparse ones
    assert "conv/bias" not in {t.name for t in folded.graph.initializer}


def test_a_subgraphs_sparse_initializer_shadows_the_outer_value_of_its_name():
    """Inside the branch, bn.scale is the branch's own sparse initializer: the BN there must not
    be folded with the main graph's bn.scale (bnfold reads no sparse tensor: it keeps the BN)."""
    from bnfold.fold import fold

    rng = np.random.default_rng(0)
    params = trained_bn_params(4, rng)
    main_inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W")]
    main_inits += [numpy_helper.from_array(v.astype(np.float32), f"bn.{k}")
                   for k, v in params.items()]
    own_scale = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([5.0], np.float32), "bn.scale"),
        numpy_helper.from_array(np.array([2])), [4])
    branch = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
         helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean",
                                                 "bn.var"], ["b_out"], name="bn")], "then",
        [], [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, [1, 4, 4, 4])],
        sparse_initializer=[own_scale])
    other = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["o_out"], name="conv_else")], "else", [],
        [helper.make_tensor_value_info("o_out", TensorProto.FLOAT, [1, 4, 4, 4])])
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], name="if", then_branch=branch,
                          else_branch=other)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], main_inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    feeds = {"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32), "flag": np.array(True)}
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    folded, report = fold(model)
    assert [d.action for d in report.decisions] == ["kept"]
    assert "not constant" in report.decisions[0].reason
    got = ort.InferenceSession(folded.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(got, expected)


def test_in_place_without_the_check_keeps_sparse_values_sharing_the_weights_data_file(
        tmp_path, monkeypatch):
    """W and the sparse values in one data file: an in-place fold rewrites that file, and must
    carry the sparse values over (they used to be dropped from it, with --no-verify nothing
    noticed, and the model could no longer be loaded: its data lost)."""
    path = sparse_model(tmp_path / "in", location="model.onnx.data")
    model = onnx.load(path, load_external_data=False)
    weight = model.graph.initializer[0]  # W, moved into the same file after the sparse values
    move_to_file(weight, tmp_path / "in" / "model.onnx.data", "model.onnx.data")
    onnx.save(model, path)
    expected = sparse_output(path)
    monkeypatch.chdir(tmp_path / "in")  # (a reader looking in the working directory finds it)
    result = CliRunner().invoke(main, ["fold", path, "--in-place", "--no-verify"])
    assert result.exit_code == 0, result.output
    assert [n.op_type for n in onnx.load(path, load_external_data=False).graph.node] == \
        ["Conv", "Identity"]
    np.testing.assert_array_equal(sparse_output(path), expected)


def test_load_external_data_reads_the_sparse_values_too(tmp_path):
    """onnx's load_external_data_for_model skips sparse tensors: load(load_external_data=True)
    must leave no tensor on disk, so that the model saves anywhere without a base_dir."""
    import bnfold
    from bnfold.wire import tensors

    path = sparse_model(tmp_path / "in")
    model = load(path, load_external_data=True)
    assert not [t.name for t in tensors(model) if t.data_location == TensorProto.EXTERNAL]
    out = tmp_path / "out.onnx"
    bnfold.save(model, out)
    expected = np.zeros(600, np.float32)
    expected[::2] = SPARSE
    np.testing.assert_array_equal(sparse_output(out), expected)


def test_the_check_of_a_model_too_large_for_one_protobuf_reads_the_sparse_values(tmp_path,
                                                                                 monkeypatch):
    """A model over 2 GB in memory goes to onnxruntime through a copy saved in a temporary
    folder, with all its data read in first: the sparse values too (they were left pointing at
    a file the temporary folder does not have)."""
    from bnfold.verify import runtime, verify

    monkeypatch.setattr(runtime, "_PROTOBUF_LIMIT", 0)  # every model counts as too large
    path = sparse_model(tmp_path / "in")
    model = onnx.load(path, load_external_data=False)
    report = verify(path, model, base_dir=str(tmp_path / "in"))
    assert report.passed and all(o.max_abs == 0.0 for o in report.outputs)


def test_in_place_leaves_a_data_file_in_a_subfolder_and_writes_its_own_beside_the_model(tmp_path):
    """A data file in a subfolder may be another model's too: an in-place fold does not rewrite
    it, and writes the model's data to <model>.data instead (as --help and the README say)."""
    path = sparse_model(tmp_path / "in", location="data/sparse.bin")
    sub_before = digest(tmp_path / "in" / "data")
    expected = sparse_output(path)
    result = CliRunner().invoke(main, ["fold", path, "--in-place"])
    assert result.exit_code == 0, result.output
    assert digest(tmp_path / "in" / "data") == sub_before
    assert sorted(os.listdir(tmp_path / "in")) == ["data", "model.onnx", "model.onnx.data"]
    np.testing.assert_array_equal(sparse_output(path), expected)


def test_a_written_model_keeps_sparse_indices_in_itself_and_loads_again(tmp_path):
    """onnx.checker cannot read a sparse tensor's indices from a data file: bnfold's output
    keeps them in the model (they used to be moved to the data file with the other tensors
    over 1 KB, and bnfold then refused its own output)."""
    path = sparse_model(tmp_path / "in")  # 300 int64 indices: 2.4 KB
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["fold", path, "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = load(out)  # with onnx.checker, by path
    assert written.graph.sparse_initializer[0].indices.data_location == TensorProto.DEFAULT


def test_sparse_indices_in_a_data_file_are_bad_input_in_one_line(tmp_path):
    path = sparse_model(tmp_path / "in")
    model = onnx.load(path, load_external_data=False)
    move_to_file(model.graph.sparse_initializer[0].indices, tmp_path / "in" / "indices.bin",
                 "indices.bin")
    onnx.save(model, path)
    result = CliRunner().invoke(main, ["inspect", path])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert "invalid model" in result.output
