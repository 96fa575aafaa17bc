"""The check's sessions built ahead (`runtime.session_ahead`): `bnfold fold` builds the original's
session during the fold and the folded model's while the check reads the models; the check takes
them instead of building its own, and its result is the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest
from click.testing import CliRunner

import bnfold.cli.fold as cli_fold
from bnfold.cli import main
from bnfold.verify import runtime
from test_cli import conv_bn_model


@pytest.fixture
def builds(monkeypatch):
    """Every session built, by path or "<proto>", and on which thread kind."""
    built = []
    real = runtime._load_session

    def counting(model, base_dir, verbose, initializers):
        import threading
        where = "ahead" if threading.current_thread().name == "bnfold-session-ahead" else "inline"
        built.append((model if isinstance(model, str) else "<proto>", where))
        return real(model, base_dir, verbose, initializers)

    monkeypatch.setattr(runtime, "_load_session", counting)
    return built


def _fold(tmp_path, *args):
    src, out, report = tmp_path / "m.onnx", tmp_path / "m.folded.onnx", tmp_path / "r.json"
    onnx.save(conv_bn_model(), src)
    result = CliRunner().invoke(main, ["fold", str(src), "-o", str(out), "--json", str(report),
                                       *args])
    assert result.exit_code == 0, result.output
    return src, out, json.loads(report.read_text())


def _by_path(builds, src):
    """The sessions built from files: the input's, then the staged output's (its name)."""
    return [(p if p == str(src) else os.path.basename(p), w) for p, w in builds if p != "<proto>"]


def test_fold_takes_both_sessions_built_ahead(tmp_path, builds):
    src, out, report = _fold(tmp_path)
    assert report["verification"]["passed"]
    assert _by_path(builds, src) == [(str(src), "ahead"), (out.name, "ahead")]


def test_without_the_check_nothing_is_built(tmp_path, builds):
    _fold(tmp_path, "--no-verify")
    assert builds == []


def test_large_inputs_build_their_sessions_in_the_check(tmp_path, builds, monkeypatch):
    monkeypatch.setattr(cli_fold, "_AHEAD_LIMIT", 0)
    src, out, report = _fold(tmp_path)
    assert report["verification"]["passed"]
    assert _by_path(builds, src) == [(str(src), "inline"), (out.name, "inline")]


def test_a_session_that_fails_ahead_fails_where_it_is_taken(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with runtime.session_ahead(bad):
        with pytest.raises(runtime.RunFailed):
            runtime.load_session(str(bad), None)
        # taken once: a second load builds its own (and fails the same way)
        with pytest.raises(runtime.RunFailed):
            runtime.load_session(str(bad), None)


def test_an_ahead_session_is_taken_once_and_only_with_the_same_verbosity(tmp_path, builds):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), path)
    with runtime.session_ahead(path):
        runtime.load_session(str(path), None, verbose=True)  # not the one ahead
        runtime.load_session(str(path), None)
        runtime.load_session(str(path), None)
    assert [w for _, w in builds] == ["ahead", "inline", "inline"]


def test_a_session_not_taken_is_waited_for_not_left_building_at_exit(tmp_path):
    """A process leaving the block while onnxruntime still builds on the other thread would be
    aborted at exit ("terminate called without an active exception"): the block waits."""
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Relu", [f"x{i}"], [f"x{i + 1}"]) for i in range(3000)]
    graph = helper.make_graph(nodes, "relus",
                              [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("x3000", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "relus.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code = ("import sys\nfrom bnfold.verify import runtime\n"
            "with runtime.session_ahead(sys.argv[1]):\n    pass\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, "")
