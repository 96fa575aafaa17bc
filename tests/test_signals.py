"""What other processes do to a write: SIGKILL at each step, SIGTERM and SIGINT, concurrent
runs on one output. The runs are forked by tests/commit_driver.py; the checks are here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from commit_cases import CASES, IN_MEMORY, check_consistent, digest, expected, leftovers, make, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "commit_driver.py")


def drive(*args, tmpdir) -> object:
    """Run the driver; TMPDIR is a folder of its own, to see what is left there."""
    env = dict(os.environ, TMPDIR=str(tmpdir))
    done = subprocess.run([sys.executable, DRIVER, *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def bnfold_files(tmpdir) -> list[str]:
    """What bnfold left in TMPDIR (onnxruntime keeps a `.ses` file there, written on import)."""
    return [n for n in os.listdir(tmpdir) if n != ".ses"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    base, tmpdir = tmp_path_factory.mktemp("kill"), tmp_path_factory.mktemp("kill-tmpdir")
    return drive("kill", base, tmpdir=tmpdir), tmpdir


@pytest.mark.parametrize("case", CASES)
def test_a_kill_at_any_step_leaves_the_old_or_the_new_model(killed, case):
    results, tmpdir = killed
    runs = results[case]
    *_, inputs = CASES[case]
    steps = 6 if case in IN_MEMORY else 8  # at least; without a scratch file, fewer
    assert len(runs) > steps and all(r["signal"] == signal.SIGKILL for r in runs[:-1])
    assert runs[-1] == {**runs[-1], "code": 0}  # past the last step: a run to its end
    states = []
    for r in runs:
        directory = r["dir"]
        fresh = directory + ".fresh"
        make(case, fresh)  # the same files as before the run, to compare the input with
        states.append(check_consistent(case, directory, digest(fresh, inputs)))
        folders, tmp_files = leftovers(directory)
        assert len(folders) <= 1, folders  # after a kill: at most one temporary folder
        assert len(tmp_files) <= 1, tmp_files  # and, within the commit, the data under TMP
        # The next run sweeps it all away.
        result = CliRunner().invoke(main, ["fold", *r["args"]])
        assert result.exit_code == 0, result.output
        assert check_consistent(case, directory, digest(fresh, inputs)) == "new"
        assert leftovers(directory) == ([], [])
    # Killed early: the old model; late: the new one; never anything else, and never back.
    assert states[0] == "old" and states[-1] == "new"
    assert states == sorted(states, key=["old", "new"].index)
    assert bnfold_files(tmpdir) == []  # nothing in TMPDIR, ever


@pytest.fixture(scope="module")
def signalled(tmp_path_factory):
    base, tmpdir = tmp_path_factory.mktemp("signal"), tmp_path_factory.mktemp("signal-tmpdir")
    return drive("signal", base, tmpdir=tmpdir), tmpdir


@pytest.mark.parametrize("number", [0, 1, 2])
def test_sigterm_and_sigint_remove_temporaries_and_exit_143_and_130(signalled, number):
    results, tmpdir = signalled
    r = results[number]
    case = "over an output with external data"
    assert r["code"] == 128 + r["signum"], r  # 143 SIGTERM, 130 SIGINT: not 1, not killed
    assert r["seconds"] < 10  # the sleep was cut short
    fresh = r["dir"] + ".fresh"
    make(case, fresh)
    state = check_consistent(case, r["dir"], digest(fresh, CASES[case][-1]))
    # Stopped while verifying: nothing written. During the commit: it completes first.
    assert state == ("new" if r["when"] == "committing" else "old")
    assert leftovers(r["dir"]) == ([], [])
    assert sorted(os.listdir(r["dir"])) == ["in.onnx", "in.onnx.data", "out.onnx",
                                            "out.onnx.data"]
    assert bnfold_files(tmpdir) == []


def test_concurrent_runs_on_one_output_leave_one_complete_result(tmp_path):
    runs, rounds = 3, 4
    results = drive("race", tmp_path / "race", runs, rounds, tmpdir=tmp_path)
    wanted = [expected(i) for i in range(runs)]
    for r in results:
        assert r["runs"] == [{"code": 0}] * runs, r
        out = os.path.join(r["dir"], "out.onnx")
        model = onnx.load(out)  # the model with its data: complete
        onnx.checker.check_model(model, full_check=True)
        assert [n.op_type for n in model.graph.node] == ["Conv"]
        got = run(out)
        matches = [i for i, w in enumerate(wanted) if np.allclose(got, w, rtol=1e-4, atol=1e-4)]
        assert len(matches) == 1  # one run's model, with that run's data
        assert sorted(os.listdir(r["dir"])) == sorted(
            [f"in{i}.onnx{ext}" for i in range(runs) for ext in ("", ".data")]
            + ["out.onnx", "out.onnx.data"])
