"""The `bnfold` command: exit codes, one-line errors, what is written (and what is not)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import bnfold.cli.fold
from bnfold.cli import main
from bnfold.errors import BadInput, Stopped, VerificationFailed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def conv_bn_model(opset: int = 17, training: bool = False) -> onnx.ModelProto:
    """x[batch, 3, 8, 8] -> Conv(4 channels, bias) -> BatchNormalization, trained-looking stats."""
    rng = np.random.default_rng(1)
    params = {"W": rng.standard_normal((4, 3, 3, 3)), "B": rng.standard_normal(4),
              "gamma": rng.uniform(0.5, 2, 4), "beta": rng.standard_normal(4),
              "mean": rng.standard_normal(4), "var": rng.uniform(0.2, 3, 4)}
    bn_attrs = {"training_mode": 1} if training else {}
    bn_outputs = ["y", "running_mean", "running_var"] if training else ["y"]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"],
                              bn_outputs, name="bn", **bn_attrs)]
    graph = helper.make_graph(
        nodes, "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn_model(), str(path))
    return path


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(directory) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def op_types(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def outputs(path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options).run(None, {"x": x})[0]


def with_changed_weight(real_fold):
    """A `fold` that works, then breaks the folded Conv's weight: verification must catch it."""

    def broken_fold(model, **kwargs):
        folded, report = real_fold(model, **kwargs)
        name = next(n for n in folded.graph.node if n.op_type == "Conv").input[1]
        t = next(t for t in folded.graph.initializer if t.name == name)
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.1, name))
        return folded, report

    return broken_fold


# --- help ---------------------------------------------------------------------------------------

def test_python_m_bnfold_help():
    result = subprocess.run([sys.executable, "-m", "bnfold", "--help"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0
    assert "fold" in result.stdout and "verify" in result.stdout
    assert "Exit codes: 0 success, 1 verification failed, 2 bad input or usage." in result.stdout
    assert "130 (SIGINT, Ctrl-C) or 143 (SIGTERM), temporary files" in result.stdout


@pytest.mark.parametrize("command", ["fold", "verify"])
def test_command_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "--dim NAME=VALUE" in result.stdout


# --- bad input: exit 2, one line, nothing written ---------------------------------------------

def valid_model(path) -> None:
    onnx.save(conv_bn_model(), str(path))


def invalid_model(path) -> None:
    model = conv_bn_model()
    model.graph.node[0].op_type = "NoSuchOp"
    onnx.save(model, str(path))


OUT = ["-o", "{dir}/out.onnx"]
BAD_INPUTS = {  # case: (how INPUT is made, arguments after INPUT, expected in the message)
    "missing file": (lambda p: None, OUT, "model.onnx: no such file"),
    "empty file": (lambda p: p.write_bytes(b""), OUT, "not an ONNX model"),
    "text file": (lambda p: p.write_text("name,value\nx,1\n"), OUT, "not an ONNX model"),
    "truncated": (lambda p: p.write_bytes(conv_bn_model().SerializeToString()[:300]), OUT,
                  "truncated or corrupt"),
    "checker rejects": (invalid_model, OUT, "invalid model: No Op registered for NoSuchOp"),
    "opset 99": (lambda p: onnx.save(conv_bn_model(opset=99), str(p)), OUT, "unsupported opset 99"),
    "output is input": (valid_model, ["-o", "{input}"], "use --in-place"),
    "output is input, other spelling": (valid_model, ["-o", "{dir}/./model.onnx"],
                                        "use --in-place"),
    "output directory missing": (valid_model, ["-o", "{dir}/no/out.onnx"], "does not exist"),
    "output is a directory": (valid_model, ["-o", "{dir}"], "is a directory"),
    "no output": (valid_model, [], "give -o OUTPUT"),
    "in-place and another output": (valid_model, ["--in-place", *OUT], "leave out -o"),
    "json directory missing": (valid_model, [*OUT, "--json", "{dir}/no/r.json"],
                               "does not exist"),
    "dim without value": (valid_model, [*OUT, "--dim", "batch"], "--dim batch: expected NAME="),
    "dim zero": (valid_model, [*OUT, "--dim", "batch=0"], "positive integer"),
    "dim not a number": (valid_model, [*OUT, "--dim", "batch=x"], "positive integer"),
    "dim without name": (valid_model, [*OUT, "--dim", "=3"], "expected NAME=VALUE"),
    "unknown dim": (valid_model, [*OUT, "--dim", "seq=3"], "unknown dimension seq"),
    "inputs file missing": (valid_model, [*OUT, "--inputs", "{dir}/none.npz"], "none.npz"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(tmp_path, case):
    make, args, expected = BAD_INPUTS[case]
    path = tmp_path / "model.onnx"
    make(path)
    before = snapshot(tmp_path)
    result = run("fold", path, *[a.format(input=path, dir=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:"), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert snapshot(tmp_path) == before  # nothing written, input untouched
    assert os.listdir(tmp_path) == (["model.onnx"] if path.exists() else [])


def test_bad_input_in_a_subprocess_has_no_traceback(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("not a model")
    result = subprocess.run([sys.executable, "-m", "bnfold", "fold", str(path), "-o",
                             str(tmp_path / "out.onnx")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr == f"bnfold: error: {path}: not an ONNX model (protobuf parse failed)\n"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_usage_error_exits_2(model_path):
    assert run("fold", model_path, "--seed", "abc").exit_code == 2
    assert run("fold").exit_code == 2


def test_unwritable_output_directory_exits_2(model_path, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write anywhere: answer as the permissions would for others
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode)
                            and os.fspath(path) != str(locked))
    result = run("fold", model_path, "-o", locked / "out.onnx")
    assert result.exit_code == 2
    assert result.stderr.startswith("bnfold: error: ")
    assert result.stderr.endswith(f"out.onnx: directory {locked} is not writable\n")
    assert os.listdir(locked) == []


# --- fold ---------------------------------------------------------------------------------------

def test_fold_writes_a_verified_model(model_path, tmp_path):
    out = tmp_path / "folded.onnx"
    before = model_path.read_bytes()
    result = run("fold", model_path, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "folded   bn backward into conv" in result.stderr
    assert "1 folded, 0 kept" in result.stderr
    assert "verification passed" in result.stderr
    assert model_path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["folded.onnx", "model.onnx"]
    onnx.checker.check_model(str(out), full_check=True)
    assert op_types(out) == ["Conv"]
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(outputs(out, x), outputs(model_path, x), rtol=1e-4, atol=1e-5)


def test_fold_json_report(model_path, tmp_path):
    result = run("fold", model_path, "-o", tmp_path / "out.onnx", "--json", tmp_path / "r.json",
                 "--dim", "batch=2", "--quiet")
    assert result.exit_code == 0 and result.stderr == ""
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["folded"] == 1 and report["kept"] == 0
    assert report["decisions"][0] | {"node": "bn", "into": "conv", "action": "folded"} \
        == report["decisions"][0]
    assert report["before"]["nodes"] == 2 and report["after"]["nodes"] == 1
    verification = report["verification"]
    assert verification["passed"] is True and "batch=2" in verification["inputs"]
    assert [o["name"] for o in verification["outputs"]] == ["y"]
    assert verification["outputs"][0]["shape"] == [2, 4, 8, 8]


def test_dry_run_writes_nothing(model_path, tmp_path):
    before = snapshot(tmp_path)
    result = run("fold", model_path, "--dry-run")
    assert result.exit_code == 0
    assert "folded   bn backward into conv" in result.stderr
    assert "verification" not in result.stderr
    assert snapshot(tmp_path) == before
    assert run("fold", model_path, "-o", tmp_path / "out.onnx", "--dry-run").exit_code == 0
    assert snapshot(tmp_path) == before


def test_dry_run_json(model_path, tmp_path):
    result = run("fold", model_path, "--dry-run", "--json", tmp_path / "plan.json")
    assert result.exit_code == 0
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "plan.json"]
    assert json.loads((tmp_path / "plan.json").read_text())["folded"] == 1


def test_no_verify(model_path, tmp_path, monkeypatch):
    monkeypatch.setattr(bnfold.cli.fold, "verify", lambda *a, **k: pytest.fail("verify was called"))
    result = run("fold", model_path, "-o", tmp_path / "out.onnx", "--no-verify",
                 "--json", tmp_path / "r.json")
    assert result.exit_code == 0
    assert "verification" not in result.stderr
    assert op_types(tmp_path / "out.onnx") == ["Conv"]
    assert json.loads((tmp_path / "r.json").read_text())["verification"] is None


def test_quiet_success_prints_nothing(model_path, tmp_path):
    result = run("fold", model_path, "-o", tmp_path / "out.onnx", "-q")
    assert result.exit_code == 0 and result.output == ""


def test_in_place(model_path, tmp_path):
    result = run("fold", model_path, "--in-place")
    assert result.exit_code == 0, result.output
    assert op_types(model_path) == ["Conv"]
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_failed_verification_writes_nothing(model_path, tmp_path, monkeypatch):
    monkeypatch.setattr(bnfold.cli.fold, "fold", with_changed_weight(bnfold.cli.fold.fold))
    before = snapshot(tmp_path)
    result = run("fold", model_path, "-o", tmp_path / "out.onnx", "--json", tmp_path / "r.json")
    assert result.exit_code == 1
    assert "verification FAILED" in result.stderr
    assert "y (float32" in result.stderr and "FAILED" in result.stderr.splitlines()[-2]
    assert result.stderr.splitlines()[-1] == "bnfold: verification failed, nothing written"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["passed"] is False
    assert snapshot(tmp_path) == before | {"r.json": snapshot(tmp_path)["r.json"]}


def test_failed_verification_is_reported_when_quiet(model_path, tmp_path, monkeypatch):
    monkeypatch.setattr(bnfold.cli.fold, "fold", with_changed_weight(bnfold.cli.fold.fold))
    result = run("fold", model_path, "-o", tmp_path / "out.onnx", "--quiet")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "bnfold: verification failed, nothing written"
    assert lines[1].startswith("  y (float32") and lines[1].endswith("FAILED")
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_force_writes_despite_failed_verification(model_path, tmp_path, monkeypatch):
    monkeypatch.setattr(bnfold.cli.fold, "fold", with_changed_weight(bnfold.cli.fold.fold))
    out = tmp_path / "out.onnx"
    result = run("fold", model_path, "-o", out, "--force")
    assert result.exit_code == 1
    assert f"written to {out} anyway (--force)" in result.stderr
    assert op_types(out) == ["Conv"]


def test_inputs_file(model_path, tmp_path):
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", x=x)
    result = run("fold", model_path, "-o", tmp_path / "out.onnx", "--inputs",
                 tmp_path / "inputs.npz", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    verification = json.loads((tmp_path / "r.json").read_text())["verification"]
    assert "inputs.npz" in verification["inputs"]
    assert verification["outputs"][0]["shape"] == [2, 4, 8, 8]


def test_tolerances_are_passed_on(model_path, tmp_path):
    result = run("fold", model_path, "-o", tmp_path / "out.onnx", "--atol", "0.5", "--rtol", "0")
    assert result.exit_code == 0
    assert "(atol 0.5, rtol 0)" in result.stderr


def test_training_mode_bn(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn_model(training=True), str(path))
    kept = run("fold", path, "-o", tmp_path / "kept.onnx")
    assert kept.exit_code == 0 and "training mode" in kept.stderr
    assert op_types(tmp_path / "kept.onnx") == ["Conv", "BatchNormalization"]
    result = run("fold", path, "-o", tmp_path / "out.onnx", "--training-to-inference")
    assert result.exit_code == 0, result.output
    assert "verification passed" in result.stderr
    assert op_types(tmp_path / "out.onnx") == ["Conv"]


def test_external_data_model(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    model = conv_bn_model()  # y = BN(Conv(x)) + shift: `shift` stays in external data
    model.graph.node[1].output[0] = "bn_out"
    model.graph.node.append(helper.make_node("Add", ["bn_out", "shift"], ["y"], name="add"))
    model.graph.initializer.append(numpy_helper.from_array(np.full((4, 1, 1), 0.5, np.float32),
                                                           "shift"))
    onnx.save(model, str(src / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    before = snapshot(src)
    result = run("fold", src / "model.onnx", "-o", dst / "out.onnx")
    assert result.exit_code == 0, result.output
    assert snapshot(src) == before
    assert sorted(os.listdir(dst)) == ["out.onnx", "out.onnx.data"]
    folded = onnx.load(str(dst / "out.onnx"), load_external_data=False)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Add"]
    assert {e.value for t in folded.graph.initializer for e in t.external_data
            if e.key == "location"} == {"out.onnx.data"}
    x = np.ones((3, 3, 8, 8), np.float32)
    np.testing.assert_allclose(outputs(dst / "out.onnx", x), outputs(src / "model.onnx", x),
                               rtol=1e-4, atol=1e-5)
    # in place, external data included; training-to-inference reads the original lazily
    result = run("fold", src / "model.onnx", "--in-place", "--training-to-inference")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(src)) == ["model.onnx", "model.onnx.data"]
    assert op_types(src / "model.onnx") == ["Conv", "Add"]
    np.testing.assert_allclose(outputs(src / "model.onnx", x), outputs(dst / "out.onnx", x))


# --- verify -------------------------------------------------------------------------------------

def test_verify_command(model_path, tmp_path, monkeypatch):
    assert run("fold", model_path, "-o", tmp_path / "good.onnx").exit_code == 0
    same = run("verify", model_path, tmp_path / "good.onnx", "--json", tmp_path / "r.json")
    assert same.exit_code == 0 and "verification passed" in same.stderr
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True

    monkeypatch.setattr(bnfold.cli.fold, "fold", with_changed_weight(bnfold.cli.fold.fold))
    assert run("fold", model_path, "-o", tmp_path / "bad.onnx", "--force").exit_code == 1
    differ = run("verify", model_path, tmp_path / "bad.onnx", "--dim", "batch=2")
    assert differ.exit_code == 1
    assert "verification FAILED" in differ.stderr and "batch=2" in differ.stderr
    assert differ.stderr.splitlines()[-1] == "bnfold: verification failed, the models differ"


def test_verify_bad_input(model_path, tmp_path):
    result = run("verify", model_path, tmp_path / "missing.onnx")
    assert result.exit_code == 2
    assert result.stderr == f"bnfold: error: {tmp_path / 'missing.onnx'}: no such file\n"
    other = tmp_path / "other.onnx"
    model = conv_bn_model()
    model.graph.output[0].name = "z"
    model.graph.node[1].output[0] = "z"
    onnx.save(model, str(other))
    result = run("verify", model_path, other)
    assert result.exit_code == 2 and result.stderr.startswith("bnfold: error:")
    assert len(result.stderr.splitlines()) == 1


def test_progress_only_on_a_terminal(model_path, tmp_path):
    def stderr_on_a_tty(*args: str) -> str:
        controller, terminal = os.openpty()
        command = [sys.executable, "-m", "bnfold", "fold", str(model_path), *args]
        subprocess.run(command, stderr=terminal, stdout=subprocess.DEVNULL, cwd=ROOT, check=True)
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 1 << 16)
            except OSError:  # EIO: the terminal is closed and drained
                chunk = b""
            if not chunk:
                break
            chunks.append(chunk)
        os.close(controller)
        return b"".join(chunks).decode()

    shown = stderr_on_a_tty("-o", str(tmp_path / "out.onnx"))
    for step in ("loading", "checking", "folding", "saving", "verifying"):
        assert f"bnfold: {step}..." in shown
    assert "1 folded" in shown
    assert stderr_on_a_tty("-o", str(tmp_path / "out.onnx"), "--quiet") == ""


@pytest.mark.parametrize("error, code, message", [
    (BadInput("bad thing"), 2, "bad thing"),
    (PermissionError(13, "Permission denied", "out.onnx"), 2, "out.onnx: Permission denied"),
    (VerificationFailed("outputs differ\nmore detail"), 1, "outputs differ"),
])
def test_errors_become_one_line(model_path, tmp_path, monkeypatch, error, code, message):
    def failing_fold(model, **kwargs):
        raise error

    monkeypatch.setattr(bnfold.cli.fold, "fold", failing_fold)
    result = run("fold", model_path, "-o", tmp_path / "out.onnx")
    assert result.exit_code == code
    assert result.stderr == f"bnfold: error: {message}\n"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_external_data_model_keeps_external_data_when_every_weight_is_new(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    model = conv_bn_model()  # every initializer is a weight or BN parameter: all replaced
    onnx.save(model, str(src / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    result = run("fold", src / "model.onnx", "-o", dst / "out.onnx")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(dst)) == ["out.onnx", "out.onnx.data"]
    x = np.ones((3, 3, 8, 8), np.float32)
    np.testing.assert_allclose(outputs(dst / "out.onnx", x), outputs(src / "model.onnx", x),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stop, code, message", [
    (KeyboardInterrupt(), 130, "bnfold: interrupted (SIGINT), temporary files removed"),
    (Stopped(signal.SIGINT), 130, "bnfold: interrupted (SIGINT), temporary files removed"),
    (Stopped(signal.SIGTERM), 143, "bnfold: terminated (SIGTERM), temporary files removed"),
])
def test_ctrl_c_and_sigterm_exit_130_and_143_and_remove_temporaries(model_path, tmp_path,
                                                                   monkeypatch, stop, code,
                                                                   message):
    # Ctrl-C used to exit 1, which means "verification failed". (Real signals, sent to a
    # process, are in tests/test_signals.py.)
    def interrupted_verify(*args, **kwargs):
        assert any(n.startswith(".bnfold-") for n in os.listdir(tmp_path))  # mid-write
        raise stop

    monkeypatch.setattr(bnfold.cli.fold, "verify", interrupted_verify)
    result = run("fold", model_path, "-o", tmp_path / "out.onnx")
    assert result.exit_code == code
    assert result.stderr.splitlines()[-1] == message
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_signal_handlers_are_restored(model_path, tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert run("fold", model_path, "-o", tmp_path / "out.onnx", "-q").exit_code == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
