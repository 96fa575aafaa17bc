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


def test_a_batch_norm_of_another_domain_builds_nothing_ahead(tmp_path, builds):
    """Not ONNX's BatchNormalization: nothing to fold, so no check, and no session built."""
    model = conv_bn_model()
    model.graph.node[1].domain = "com.example"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    src, out = tmp_path / "m.onnx", tmp_path / "m.folded.onnx"
    onnx.save(model, src)
    result = CliRunner().invoke(main, ["fold", str(src), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "nothing to fold" in result.output
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


def _relus(tmp_path, count: int):
    """A file of `count` Relus in a row: a session that takes a while to build."""
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Relu", [f"x{i}"], [f"x{i + 1}"]) for i in range(count)]
    graph = helper.make_graph(
        nodes, "relus", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(f"x{count}", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "relus.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_session_not_taken_is_waited_for_not_left_building_at_exit(tmp_path):
    """A process leaving the block while onnxruntime still builds on the other thread would be
    aborted at exit ("terminate called without an active exception"): the block waits."""
    path = _relus(tmp_path, 3000)
    code = ("import sys\nfrom bnfold.verify import runtime\n"
            "with runtime.session_ahead(sys.argv[1]):\n    pass\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, "")


def test_a_signal_during_the_build_ahead_reaches_the_main_thread_at_once(tmp_path):
    """SIGINT sent while the session is built ahead and the main thread blocks in a long call
    (here a sleep): the call is cut short. Were the signal taken by the building thread, or by a
    worker thread onnxruntime starts from it, Python would only act once the sleep ended. Before
    the building thread blocked SIGINT, this happened in 6 runs of 20 on a busy machine (two
    processes spinning, as here) and about 1 in 60 on an idle one; after it, in none of 40."""
    import signal
    import time
    path = _relus(tmp_path, 300)
    code = ("import os, sys, time\nfrom bnfold.verify import runtime\n"
            "with runtime.session_ahead(sys.argv[1]):\n"
            "    try:\n        os.write(1, b'x')\n        time.sleep(30)\n"
            "    except KeyboardInterrupt:\n        sys.exit(130)\n")
    spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    delays = []
    try:
        for _ in range(12):
            child = subprocess.Popen([sys.executable, "-c", code, str(path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert child.stdout.read(1) == b"x"  # the build has started, the sleep starts
            start = time.monotonic()
            child.send_signal(signal.SIGINT)
            _, err = child.communicate(timeout=60)
            delays.append(round(time.monotonic() - start, 1))
            assert child.returncode == 130, err
    finally:
        for spinner in spinning:
            spinner.kill()
            spinner.wait()
    assert max(delays) < 10, delays


def _thread_masks() -> dict[int, int]:
    """Each thread of this process (by id) and the signals it blocks (a bit mask, bit n-1 for
    signal n), from /proc."""
    masks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except FileNotFoundError:  # ended meanwhile
            continue
        masks[int(tid)] = int(fields["SigBlk"], 16)
    return masks


@pytest.mark.parametrize("where", ["inline", "ahead"])
def test_onnxruntime_threads_leave_sigint_and_sigterm_to_the_main_thread(tmp_path, where):
    """The mechanism behind the test above, seen directly: every thread onnxruntime starts for
    a session blocks SIGINT and SIGTERM, and the main thread's mask is as it was."""
    import signal
    import threading
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), path)
    before = _thread_masks()
    main_mask = before[threading.main_thread().native_id]
    if where == "ahead":
        with runtime.session_ahead(path):
            session = runtime.load_session(str(path), None)
    else:
        session = runtime.load_session(str(path), None)
    started = {tid: mask for tid, mask in _thread_masks().items() if tid not in before}
    if not started:
        pytest.skip("onnxruntime started no worker thread here (one core?)")
    stops = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    assert all(mask & stops == stops for mask in started.values()), started
    assert _thread_masks()[threading.main_thread().native_id] == main_mask
    del session
