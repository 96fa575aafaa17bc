"""bnfold.io: one-line errors for unusable files; atomic, streaming saves keeping external data."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold.io
import bnfold.serialize
from bnfold.errors import BadInput
from bnfold.io import load, save, staged

MB_FLOATS = 1 << 18  # float32 elements in 1 MiB


def add_chain_model(n_weights: int = 3, size: int = MB_FLOATS, opset: int = 17) -> onnx.ModelProto:
    """y = x + w0 + w1 + ..., every w a distinct float32 initializer of `size` elements."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(size).astype(np.float32), f"w{i}")
               for i in range(n_weights)]
    names = ["x"] + [f"s{i}" for i in range(n_weights - 1)] + ["y"]
    nodes = [helper.make_node("Add", [names[i], f"w{i}"], [names[i + 1]], name=f"add{i}")
             for i in range(n_weights)]
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def save_external(model: onnx.ModelProto, path) -> None:
    """onnx's own external-data save, on a copy (onnx.save moves the data out of its argument)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=os.path.basename(path) + ".data", size_threshold=0)


def arrays(model: onnx.ModelProto, base_dir: str = "") -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t, base_dir) for t in model.graph.initializer}


def digest(directory) -> dict[str, str]:
    """Every file in `directory` with a hash of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def assert_bad_input(path, *fragments: str) -> None:
    with pytest.raises(BadInput) as err:
        load(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message


# --- load: bad input ----------------------------------------------------------------------------

def test_missing_file_is_bad_input(tmp_path):
    assert_bad_input(tmp_path / "model.onnx", "no such file")


def test_directory_is_bad_input(tmp_path):
    assert_bad_input(tmp_path, "cannot read")


@pytest.mark.parametrize("content", [b"", b"hello, this is not a model\n", bytes(range(256))])
def test_non_model_is_bad_input(tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    assert_bad_input(path, "not an ONNX model")


def test_truncated_model_is_bad_input(tmp_path):
    data = add_chain_model(size=64).SerializeToString()
    path = tmp_path / "model.onnx"
    path.write_bytes(data[: len(data) // 2])
    assert_bad_input(path, "truncated or corrupt", "'graph'")


def test_checker_rejection_is_bad_input(tmp_path):
    model = add_chain_model(size=8)
    model.graph.node[0].op_type = "NoSuchOp"
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    assert_bad_input(path, "invalid model: No Op registered for NoSuchOp")


@pytest.mark.parametrize("size", [8, 4096])  # checked by onnx.checker / by bnfold, unread
def test_tensor_data_shorter_than_its_shape_is_bad_input(tmp_path, size):
    model = add_chain_model(size=size)
    tensor = model.graph.initializer[0]
    tensor.raw_data = tensor.raw_data[:-4]
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(BadInput, match="invalid model"):
        load(path)


@pytest.mark.parametrize("size", [512, MB_FLOATS // 4])  # a few KB, copied then cleared; 1 MB
def test_tensor_data_longer_than_its_shape_is_bad_input(tmp_path, size):
    # onnx.checker accepts raw_data longer than the shape needs: bnfold's own count refuses it
    model = add_chain_model(size=size)
    model.graph.initializer[1].raw_data += b"\0" * 4
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    assert_bad_input(path, f"invalid model: tensor 'w1' holds {4 * size + 4} bytes, its shape "
                           f"[{size}] needs {4 * size}")


def load_recording_the_checked(tmp_path, monkeypatch, size: int):
    """Load a chain model of `size`-element weights; (the model, what onnx.checker was given)."""
    checked = []
    monkeypatch.setattr(onnx.checker, "check_model",
                        lambda model, full_check=False: checked.append(model))
    path = tmp_path / "model.onnx"
    onnx.save(add_chain_model(size=size), str(path))
    return load(path), checked


def test_large_weights_are_checked_without_running_the_checker_on_them(tmp_path, monkeypatch):
    _, checked = load_recording_the_checked(tmp_path, monkeypatch, 4096)
    (shell,) = checked
    assert all(list(t.dims) in ([0], [1]) or t.ByteSize() < 2048 for t in shell.graph.initializer)


def test_a_model_whose_weights_are_all_small_is_checked_itself_not_a_copy(tmp_path, monkeypatch):
    model, checked = load_recording_the_checked(tmp_path, monkeypatch, 8)
    assert len(checked) == 1 and checked[0] is model


@pytest.mark.parametrize("opset", [0, 99])
def test_unsupported_opset_is_bad_input(tmp_path, opset):
    path = tmp_path / "model.onnx"
    onnx.save(add_chain_model(size=8, opset=opset), str(path))
    newest = onnx.defs.onnx_opset_version()
    assert_bad_input(path, f"unsupported opset {opset} (bnfold supports 1..{newest})")


@pytest.mark.parametrize("opset", [1, 5, 6])
def test_opset_below_7_loads(tmp_path, opset):
    """fold passes such models through, or converts them when they have batch norms."""
    path = tmp_path / "model.onnx"
    onnx.save(add_chain_model(size=8, opset=opset), str(path))
    assert load(path).opset_import[0].version == opset


def test_missing_external_data_is_bad_input(tmp_path):
    path = tmp_path / "model.onnx"
    save_external(add_chain_model(size=64), path)
    os.remove(tmp_path / "model.onnx.data")
    assert_bad_input(path, "tensor 'w0'", "'model.onnx.data' not found")


def test_truncated_external_data_is_bad_input(tmp_path):
    path = tmp_path / "model.onnx"
    save_external(add_chain_model(size=64), path)
    with open(tmp_path / "model.onnx.data", "r+b") as f:
        f.truncate(100)
    assert_bad_input(path, "ends past the end of 'model.onnx.data'")


def test_external_data_outside_model_directory_is_bad_input(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "model.onnx"
    save_external(add_chain_model(size=64), path)
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        next(e for e in t.external_data if e.key == "location").value = "../model.onnx.data"
    os.replace(path.with_name("model.onnx.data"), tmp_path / "model.onnx.data")
    onnx.save(model, str(path))
    with pytest.raises(BadInput, match="is not inside the model's directory"):
        load(path, check=False)


def test_progress_names_the_slow_steps(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(add_chain_model(size=8), str(path))
    steps = []
    load(path, progress=steps.append)
    assert steps == ["loading", "checking"]


# --- load: good input ---------------------------------------------------------------------------

def test_load_leaves_external_data_on_disk(tmp_path):
    original = add_chain_model()
    path = tmp_path / "model.onnx"
    save_external(original, path)
    lazy = load(path)
    assert all(t.data_location == TensorProto.EXTERNAL for t in lazy.graph.initializer)
    assert lazy.ByteSize() < 10_000
    full = load(path, load_external_data=True)
    assert all(t.data_location == TensorProto.DEFAULT for t in full.graph.initializer)
    for name, value in arrays(original).items():
        np.testing.assert_array_equal(arrays(lazy, str(tmp_path))[name], value)
        np.testing.assert_array_equal(arrays(full)[name], value)


# --- save ---------------------------------------------------------------------------------------

def test_save_small_model_inline(tmp_path):
    model = add_chain_model(size=8)
    save(model, tmp_path / "out.onnx")
    assert os.listdir(tmp_path) == ["out.onnx"]
    assert onnx.load(str(tmp_path / "out.onnx")) == model


def test_one_buffer_and_streamed_single_file_writes_are_the_same_model(tmp_path, monkeypatch):
    # A small in-memory model is serialized in one call; larger ones are streamed a tensor at a
    # time: both must read back as the model, tensors in subgraphs and attributes included.
    model = add_chain_model(size=300)  # 1.2 KB tensors: over the inline threshold
    then = helper.make_graph([helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(
        np.arange(400, dtype=np.float32)))], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [400])])
    model.graph.node.append(helper.make_node("If", ["c"], ["o"], then_branch=then,
                                             else_branch=then))
    save(model, tmp_path / "one.onnx")
    monkeypatch.setattr(bnfold.serialize, "_ONE_BUFFER", 0)
    save(model, tmp_path / "streamed.onnx")
    assert sorted(os.listdir(tmp_path)) == ["one.onnx", "streamed.onnx"]
    for name in ("one.onnx", "streamed.onnx"):
        assert onnx.load(str(tmp_path / name)) == model


def test_save_of_external_data_needs_base_dir(tmp_path):
    save_external(add_chain_model(size=300), tmp_path / "model.onnx")
    model = load(tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="pass base_dir"):
        save(model, tmp_path / "copy.onnx")
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]


def test_round_trip_with_external_data(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    original = add_chain_model(n_weights=4)
    save_external(original, src / "model.onnx")
    before = digest(src)

    model = load(src / "model.onnx")
    replacement = np.arange(MB_FLOATS, dtype=np.float32)
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(replacement, "w1"))
    # A small in-memory tensor stays inline; a larger one joins the sidecar.
    model.graph.node.append(helper.make_node(
        "Constant", [], ["c"], value=numpy_helper.from_array(np.ones(4, np.float32))))
    snapshot = model.SerializeToString()
    save(model, dst / "folded.onnx", base_dir=str(src))

    assert model.SerializeToString() == snapshot  # save leaves its argument as it was
    assert digest(src) == before  # and never touches the input's files
    assert sorted(os.listdir(dst)) == ["folded.onnx", "folded.onnx.data"]
    reloaded = load(dst / "folded.onnx")
    locations = {e.value for t in reloaded.graph.initializer for e in t.external_data
                 if e.key == "location"}
    assert locations == {"folded.onnx.data"}
    assert reloaded.graph.node[-1].attribute[0].t.data_location == TensorProto.DEFAULT
    expected = arrays(original) | {"w1": replacement}
    got = arrays(load(dst / "folded.onnx", load_external_data=True))
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_save_in_place(tmp_path):
    path = tmp_path / "model.onnx"
    original = add_chain_model()
    save_external(original, path)
    model = load(path)
    replacement = np.full(MB_FLOATS, 7, np.float32)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(replacement, "w0"))
    save(model, path, base_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    got = arrays(load(path, load_external_data=True))
    np.testing.assert_array_equal(got["w0"], replacement)
    for name in ("w1", "w2"):
        np.testing.assert_array_equal(got[name], arrays(original)[name])


def test_tensors_in_subgraphs_go_to_the_sidecar(tmp_path):
    value = np.arange(1024, dtype=np.float32)
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(value))],
        "then", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1024])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(2048, np.float32), "big"))
    save_external(model, tmp_path / "in.onnx")
    lazy = load(tmp_path / "in.onnx")
    save(lazy, tmp_path / "out.onnx", base_dir=str(tmp_path))
    out = load(tmp_path / "out.onnx")
    for g in (out.graph.node[0].attribute[0].g, out.graph.node[0].attribute[1].g):
        t = g.node[0].attribute[0].t
        assert t.data_location == TensorProto.EXTERNAL
        np.testing.assert_array_equal(numpy_helper.to_array(t, str(tmp_path)), value)


def test_model_over_protobuf_limit_gets_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(bnfold.serialize, "PROTOBUF_LIMIT", 1 << 20)
    model = add_chain_model()  # 3 MiB in memory, "too large" now
    save(model, tmp_path / "out.onnx")
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]
    assert os.path.getsize(tmp_path / "out.onnx") < 10_000
    for name, value in arrays(load(tmp_path / "out.onnx", load_external_data=True)).items():
        np.testing.assert_array_equal(value, arrays(model)[name])


def test_failed_save_writes_nothing(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    save_external(add_chain_model(size=64), src / "model.onnx")
    model = load(src / "model.onnx")
    os.remove(src / "model.onnx.data")
    with pytest.raises(FileNotFoundError):
        save(model, dst / "out.onnx", base_dir=str(src))
    assert os.listdir(dst) == []


def test_saved_file_permissions_follow_umask(tmp_path):
    save(add_chain_model(size=8), tmp_path / "out.onnx")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "out.onnx").st_mode & 0o777 == 0o666 & ~mask


# --- staged -------------------------------------------------------------------------------------

def test_staged_renames_model_and_sidecar_into_place(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_external(add_chain_model(), src / "model.onnx")
    model = load(src / "model.onnx")
    final = tmp_path / "out.onnx"
    with staged(final) as stage:
        stage.save(model, base_dir=str(src))
        assert os.path.dirname(stage.folder) == str(tmp_path)
        assert os.path.basename(stage.folder).startswith(".bnfold-")
        assert load(stage.path).graph.initializer[0].data_location == TensorProto.EXTERNAL
        assert not final.exists()
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data", "src"]
    got = arrays(load(final, load_external_data=True))
    for name, value in arrays(model, str(src)).items():
        np.testing.assert_array_equal(got[name], value)


def test_staged_discard_leaves_nothing(tmp_path):
    with staged(tmp_path / "out.onnx") as stage:
        stage.save(add_chain_model())
        stage.discard()
    assert os.listdir(tmp_path) == []


def test_staged_error_leaves_nothing_and_keeps_old_file(tmp_path):
    final = tmp_path / "out.onnx"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with staged(final) as stage:
            stage.save(add_chain_model())
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["out.onnx"]
    assert final.read_bytes() == b"old"


# --- memory (run on demand: pytest -m slow) -----------------------------------------------------

@pytest.mark.slow
def test_saving_external_data_streams(tmp_path):
    """Re-saving a 1 GiB external-data model must not hold it in memory."""
    n, size = 8, 1 << 27  # 8 tensors of 128 MiB
    graph = helper.make_graph(
        [], "g", [], [helper.make_tensor_value_info("w0", TensorProto.UINT8, [size])])
    for i in range(n):
        t = graph.initializer.add(name=f"w{i}", data_type=TensorProto.UINT8, dims=[size])
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "in.onnx.data"), ("offset", i * size), ("length", size)):
            t.external_data.add(key=key, value=str(value))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "in.onnx"))
    with open(tmp_path / "in.onnx.data", "wb") as f:
        f.truncate(n * size)  # sparse: costs no disk until copied
    script = textwrap.dedent(f"""
        import bnfold.io
        model = bnfold.io.load({str(tmp_path / "in.onnx")!r})
        bnfold.io.save(model, {str(tmp_path / "out.onnx")!r}, base_dir={str(tmp_path)!r})
        # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at the parent's RSS (a pytest
        # that has imported torch: 555 MiB), while exec gives VmHWM a new address space.
        status = open("/proc/self/status").read()
        print(int(status.split("VmHWM:")[1].split()[0]) * 1024)
    """)
    peak = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout)
    assert os.path.getsize(tmp_path / "out.onnx.data") == n * size
    assert peak < (n * size) // 4, f"peak RSS {peak >> 20} MiB for {n * size >> 20} MiB of data"


# --- what the commit protocol adds to load / save (more in tests/test_commit.py) ---------------

def test_checker_runs_on_a_shell_for_main_graph_external_data(tmp_path, monkeypatch):
    # Regression: main-graph initializers were told from others by id(), which protobuf's
    # wrappers do not keep: the checker then read every external tensor from the file.
    checked = []
    monkeypatch.setattr(onnx.checker, "check_model",
                        lambda model, full_check=False: checked.append(model))
    save_external(add_chain_model(n_weights=5, size=64), tmp_path / "model.onnx")
    load(tmp_path / "model.onnx")
    (shell,) = checked
    assert isinstance(shell, onnx.ModelProto)
    assert all(t.data_location == TensorProto.DEFAULT for t in shell.graph.initializer)


@pytest.mark.parametrize("key, value, message", [
    ("length", "252", "length 252 bytes, but its shape [64] needs 256"),
    ("offset", "-1", "offset '-1' is not a non-negative integer"),
    ("offset", "0x10", "offset '0x10' is not a non-negative integer"),
])
def test_bad_external_data_reference_is_bad_input(tmp_path, key, value, message):
    path = tmp_path / "model.onnx"
    save_external(add_chain_model(size=64), path)
    model = onnx.load(str(path), load_external_data=False)
    next(e for e in model.graph.initializer[1].external_data if e.key == key).value = value
    onnx.save(model, str(path))
    assert_bad_input(path, "external data of tensor 'w1'", message)


def test_external_data_that_is_a_fifo_is_bad_input(tmp_path):
    path = tmp_path / "model.onnx"
    save_external(add_chain_model(size=64), path)
    os.remove(tmp_path / "model.onnx.data")
    os.mkfifo(tmp_path / "model.onnx.data")
    assert_bad_input(path, "'model.onnx.data' is not a regular file")


def test_load_inputs(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.savez(tmp_path / "x.npz", x=x, n=np.int64(3))
    got = bnfold.io.load_inputs(tmp_path / "x.npz")
    assert sorted(got) == ["n", "x"]
    np.testing.assert_array_equal(got["x"], x)


@pytest.mark.parametrize("make, message", [
    (lambda p: np.savez(p, x=np.array([None, 1], dtype=object)), "holds Python objects"),
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: np.savez(p), "holds no arrays"),
    (lambda p: np.save(p, np.zeros(3)), "is not an .npz archive"),
    (lambda p: os.mkfifo(p), "not a regular file (a named pipe)"),
    (lambda p: None, "no such file"),
])
def test_unusable_inputs_are_bad_input(tmp_path, make, message):
    path = tmp_path / "x.npz"
    make(path)
    if path.with_suffix(".npz.npy").exists():  # np.save adds .npy
        os.replace(path.with_suffix(".npz.npy"), path)
    with pytest.raises(BadInput) as err:
        bnfold.io.load_inputs(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_save_reports_what_it_wrote_and_writes_through_symlinks(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink("real/target.onnx", tmp_path / "link.onnx")
    written = save(add_chain_model(), tmp_path / "link.onnx", external_data=True)
    assert (written.data, written.notes) == ("target.onnx.data", [])
    assert os.readlink(tmp_path / "link.onnx") == "real/target.onnx"
    assert sorted(os.listdir(tmp_path / "real")) == ["target.onnx", "target.onnx.data"]
    got = arrays(load(tmp_path / "real" / "target.onnx", load_external_data=True))
    for name, value in arrays(add_chain_model()).items():
        np.testing.assert_array_equal(got[name], value)


def _if_with_external_branch_weight(directory) -> str:
    """A model whose If's then-branch adds an initializer kept in external data (m.data)."""
    w = numpy_helper.from_array(np.arange(2000, dtype=np.float32), "w")
    branch = helper.make_graph([helper.make_node("Add", ["x", "w"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2000])],
                               [w])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2000])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2000])])
    path = os.path.join(directory, "m.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path,
              save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    return path


def test_external_data_in_a_subgraph_is_checked_and_left_on_disk(tmp_path):
    path = _if_with_external_branch_weight(tmp_path)
    model = load(path)
    then_branch = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    assert then_branch.initializer[0].data_location == TensorProto.EXTERNAL
    with open(tmp_path / "m.data", "r+b") as f:  # cut short: refused, naming the tensor
        f.truncate(4000)
    with pytest.raises(BadInput, match="external data of tensor 'w'"):
        load(path)
