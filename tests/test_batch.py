"""bnfold fold A.onnx B.onnx DIR/ --output-dir OUT: many models in one run, --jobs N workers, one
JSON summary, the worst exit code of the models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from tests.builders import conv_bn, keras_mlp
from tests.test_json_report import assert_valid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def models(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(conv_bn(), str(folder / "conv.onnx"))
    onnx.save(keras_mlp(), str(folder / "mlp.onnx"))
    onnx.save(conv_bn(training_mode=1, opset=15, n_outputs=3), str(folder / "kept.onnx"))
    return folder


def broken(path) -> None:
    path.write_bytes(b"not a model")


def test_several_files_go_to_the_output_dir_with_one_summary(models, tmp_path):
    out = tmp_path / "out"
    result = run("fold", models / "conv.onnx", models / "mlp.onnx", "--output-dir", out,
                 "--json", tmp_path / "summary.json")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ["conv.onnx", "mlp.onnx"]
    assert result.stderr.count("verification passed") == 2
    assert result.stderr.index("== " + str(models / "conv.onnx")) < \
        result.stderr.index("== " + str(models / "mlp.onnx"))
    assert result.stderr.splitlines()[-1] == "bnfold: 2 models: 2 ok"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert_valid(summary)
    assert summary["exit_code"] == 0 and summary["counts"]["ok"] == 2
    assert [m["input"] for m in summary["models"]] == [str(models / "conv.onnx"),
                                                        str(models / "mlp.onnx")]
    assert [m["output"] for m in summary["models"]] == [str(out / "conv.onnx"),
                                                         str(out / "mlp.onnx")]
    assert all(m["verification"]["passed"] for m in summary["models"])


def test_a_folder_stands_for_its_onnx_files(models, tmp_path):
    (models / "notes.txt").write_text("not a model")
    result = run("fold", models, "--output-dir", tmp_path / "out", "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [os.path.basename(m["input"]) for m in summary["models"]] == [
        "conv.onnx", "kept.onnx", "mlp.onnx"]
    assert sorted(os.listdir(tmp_path / "out")) == ["conv.onnx", "kept.onnx", "mlp.onnx"]


def test_exit_code_is_the_worst_of_the_models(models, tmp_path):
    out = tmp_path / "out"
    strict = run("fold", models, "--output-dir", out, "--strict", "--json", "-", "-q")
    assert strict.exit_code == 3
    assert [m["exit_code"] for m in json.loads(strict.stdout)["models"]] == [0, 3, 0]
    broken(models / "bad.onnx")
    result = run("fold", models, "--output-dir", out, "--strict", "--json", "-", "-q")
    assert result.exit_code == 2
    summary = json.loads(result.stdout)
    assert_valid(summary)
    bad = summary["models"][0]
    assert bad["input"].endswith("bad.onnx") and bad["exit_code"] == 2
    assert "bad.onnx" in bad["error"] and f"bnfold: error: {bad['error']}" in result.stderr
    assert summary["counts"] == {"models": 4, "ok": 2, "bad_input": 1,
                                 "verification_failed": 0, "strict_kept": 1}
    assert os.path.exists(out / "mlp.onnx")  # the others are folded all the same
    assert "bnfold: 4 models: 2 ok, 1 bad input, 1 strict kept" in result.stderr


def test_a_failed_verification_outranks_strict(models, tmp_path, monkeypatch):
    import bnfold.cli.fold
    from tests.test_cli import with_changed_weight

    monkeypatch.setattr(bnfold.cli.fold, "fold", with_changed_weight(bnfold.cli.fold.fold))
    result = run("fold", models / "conv.onnx", models / "kept.onnx", "--output-dir",
                 tmp_path / "out", "--strict", "-q")
    assert result.exit_code == 1
    assert not (tmp_path / "out" / "conv.onnx").exists()


@pytest.mark.parametrize("args, message", [
    (["-o", "x.onnx"], "several models: -o names one output; give --output-dir OUT"),
    ([], "several models: give --output-dir OUT, --in-place or --dry-run"),
    (["--output-dir", "out", "--in-place"], "--in-place and --output-dir: choose one"),
    (["--output-dir", "out", "--jobs", "0"], "--jobs 0: give 1 or more"),
    (["--output-dir", "no/such/dir"], "its parent folder does not exist"),
])
def test_bad_batch_usage_exits_2_before_any_work(models, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = run("fold", models / "conv.onnx", models / "mlp.onnx", *args)
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_two_models_with_one_name_or_an_output_over_an_input_are_refused(models, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    onnx.save(conv_bn(), str(other / "conv.onnx"))
    clash = run("fold", models / "conv.onnx", other / "conv.onnx", "--output-dir", tmp_path / "o")
    assert clash.exit_code == 2 and "would both be written to" in clash.stderr
    over = run("fold", models / "conv.onnx", models / "mlp.onnx", "--output-dir", models)
    assert over.exit_code == 2
    assert over.stderr == (f"bnfold: error: the output of {models / 'conv.onnx'} "
                           f"{models / 'conv.onnx'}: is {models / 'conv.onnx'}\n")


def test_dry_run_and_in_place_batches(models, tmp_path):
    before = (models / "conv.onnx").read_bytes()
    dry = run("fold", models, "--dry-run", "-q")
    assert dry.exit_code == 0 and (models / "conv.onnx").read_bytes() == before
    in_place = run("fold", models / "conv.onnx", models / "mlp.onnx", "--in-place", "-q")
    assert in_place.exit_code == 0
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(models / "conv.onnx").graph.node}


def test_jobs_in_a_subprocess_give_the_same_outputs_and_exit_code(models, tmp_path):
    broken(models / "bad.onnx")
    alone = run("fold", models, "--output-dir", tmp_path / "out1", "--json", "-", "-q")
    done = subprocess.run([sys.executable, "-m", "bnfold", "fold", str(models), "--output-dir",
                           str(tmp_path / "out2"), "--jobs", "2", "--json", "-", "-q"],
                          capture_output=True, text=True, cwd=ROOT)
    assert alone.exit_code == done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr == alone.stderr  # the same reports, in the same order
    summaries = [json.loads(alone.stdout), json.loads(done.stdout)]
    assert [s["jobs"] for s in summaries] == [1, 2]
    assert [[m["exit_code"] for m in s["models"]] for s in summaries] == [[2, 0, 0, 0]] * 2
    written = [{name: (tmp_path / out / name).read_bytes()
                for name in sorted(os.listdir(tmp_path / out))} for out in ("out1", "out2")]
    assert written[0] == written[1] and len(written[0]) == 3


def test_sigterm_stops_the_workers_and_leaves_no_temporary_files(tmp_path):
    import shutil
    import signal
    import time

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        shutil.copy(os.path.join(ROOT, "models", "cnn_conv_bn_relu.onnx"), folder / f"m{i}.onnx")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "bnfold", "fold", str(folder), "--output-dir",
                             str(out), "--jobs", "2", "-q"], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while not (out.is_dir() and any(n.endswith(".onnx") for n in os.listdir(out))):
        assert proc.poll() is None and time.monotonic() < deadline, "no model written"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, stderr
    assert stderr == "bnfold: terminated (SIGTERM), temporary files removed\n", stderr
    left = [n for n in os.listdir(out) if not n.endswith(".onnx")]
    assert not left, [(n, sorted(str(p.relative_to(out)) for p in (out / n).rglob("*")))
                      for n in left]
    assert len(os.listdir(out)) < 40


@pytest.mark.parametrize("via_process", [False, True], ids=["to-main-thread", "to-process"])
@pytest.mark.parametrize("other_thread", [False, True], ids=["alone", "with-a-thread"])
def test_a_signal_held_while_the_stage_folder_is_made_leaves_no_folder(tmp_path, monkeypatch,
                                                                       via_process, other_thread):
    """Regression: SIGTERM held while a stage folder was made arrived when the hold ended, inside
    Stage's constructor, before `staged` could remove the folder (found by the test above)."""
    import signal
    import tempfile
    import threading

    from bnfold import commit
    from bnfold.errors import Stopped

    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp_then_signal(*args, **kwargs):
        folder = real_mkdtemp(*args, **kwargs)
        # Held until the folder is ready: blocked in this thread, deferred when another thread
        # (onnxruntime's) takes it.
        (os.kill(os.getpid(), signal.SIGTERM) if via_process else
         signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM))
        return folder

    def stop(signum, frame):  # as bnfold's handlers do
        if not commit.defer_if_held(signum):
            raise Stopped(signum)

    monkeypatch.setattr(commit.tempfile, "mkdtemp", mkdtemp_then_signal)
    if other_thread:  # a thread that does not block the signal, as onnxruntime's
        threading.Thread(target=threading.Event().wait, args=(5,), daemon=True).start()
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stopped):
            with commit.staged(tmp_path / "out.onnx"):
                pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("signum, code", [(15, 143), (2, 130)])
def test_a_signal_wrapped_in_another_error_still_exits_143_or_130(models, tmp_path, monkeypatch,
                                                                  signum, code):
    """Regression: SIGTERM during the first `import onnxruntime` came out as onnxruntime's
    ImportError("initialization failed") with a traceback, not as exit 143."""
    import bnfold.cli.fold
    from bnfold.errors import Stopped

    def interrupted_import(*args, **kwargs):
        try:
            raise Stopped(signum) if signum == 15 else KeyboardInterrupt()
        except BaseException as stop:
            raise ImportError("initialization failed") from stop

    monkeypatch.setattr(bnfold.cli.fold, "verify", interrupted_import)
    result = run("fold", models / "conv.onnx", "-o", tmp_path / "out.onnx")
    assert result.exit_code == code
    assert result.stderr.splitlines()[-1].endswith("temporary files removed")
    assert "Traceback" not in result.output and not os.path.exists(tmp_path / "out.onnx")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".bnfold")] == []
