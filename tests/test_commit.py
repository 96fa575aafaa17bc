"""The commit protocol (bnfold/commit.py) through the CLI: every path a user can name, failures
injected at each step of a write, in-place writes, disks that fill up, what is left behind.
Kills, signals and concurrent runs, which need other processes, are in tests/test_signals.py."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import subprocess
import sys
import tempfile
import threading

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import bnfold
import bnfold.cli.fold
import bnfold.serialize
from bnfold.cli import main
from bnfold.commit import save
from commit_cases import (CASES, IN_MEMORY, X, check_consistent, conv_bn, digest, expected,
                          leftovers, make, run, save_model, spill_above)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(directory) -> dict[str, tuple]:
    """Every entry under `directory`: its kind, mode and content hash."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            content = os.readlink(path) if stat.S_ISLNK(st.st_mode) else (
                digest(root, [name])[name] if stat.S_ISREG(st.st_mode) else None)
            out[os.path.relpath(path, directory)] = (stat.S_IFMT(st.st_mode),
                                                     stat.S_IMODE(st.st_mode), content)
    return out


def assert_refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def external_model(directory, name: str = "m.onnx", data: str = "m.onnx.data", seed: int = 0):
    path = os.path.join(directory, name)
    save_model(conv_bn(seed), path, data)
    return path


# --- a failing rename, link or unlink at each step ----------------------------------------------

class FailAt:
    """os.replace, os.rename, os.link and os.unlink, the k-th call among them failing (EIO)."""

    NAMES = ("replace", "rename", "link", "unlink")

    def __init__(self, monkeypatch, k: int, error: int = errno.EIO, only: str | None = None):
        self.k, self.calls, self.failed = k, 0, None
        for name in self.NAMES:
            if only in (None, name):
                monkeypatch.setattr(os, name, self._failing(name, getattr(os, name), error))

    def _failing(self, name, real, error):
        def call(*args, **kwargs):
            self.calls += 1
            if self.k in (self.calls, 0):  # k = 0: every call fails
                self.failed = name
                raise OSError(error, os.strerror(error), args[0])
            return real(*args, **kwargs)
        return call


@pytest.mark.parametrize("case", CASES)
def test_a_failing_step_leaves_the_old_or_the_new_model(tmp_path, monkeypatch, case):
    *_, inputs = CASES[case]
    if spill_above(case) is not None:
        monkeypatch.setattr(bnfold.cli.fold, "_SPILL_ABOVE", spill_above(case))
    failed = []
    for k in range(1, 40):
        directory = tmp_path / f"k{k}"
        args = make(case, directory)
        before = digest(directory, inputs)
        with monkeypatch.context() as patch:
            faults = FailAt(patch, k)
            result = cli("fold", *args, "-q")
        if faults.failed is None:  # past the last step: a run without faults
            assert result.exit_code == 0 and check_consistent(case, directory, before) == "new"
            assert leftovers(directory) == ([], [])
            break
        failed.append(faults.failed)
        state = check_consistent(case, directory, before)
        if result.exit_code == 2:  # failed before the commit: the old model, nothing else
            assert_refused(result, "cannot write", "Input/output error")
            assert state == "old"
        else:  # after it: the new model (a note says if its data kept a temporary name)
            assert result.exit_code == 0, result.output
            assert state == "new"
        folders, tmp_files = leftovers(directory)
        assert len(folders) <= 1 and len(tmp_files) <= 1  # only when a removal failed
        # The next run sweeps away what this one left, and writes the new model.
        assert cli("fold", *args, "-q").exit_code == 0
        assert check_consistent(case, directory, before) == "new"
        assert leftovers(directory) == ([], [])
    else:
        pytest.fail("the run never ended without a fault")
    # removing the old data, or temporaries (the scratch weights): none for a small model
    assert ("unlink" in failed) == (case not in IN_MEMORY)
    two_steps = "single-file" not in case  # the model there reads the data name
    assert failed.count("replace") == (4 if two_steps else 1)


def test_a_failed_second_step_keeps_the_new_model_on_its_temporary_data(tmp_path,
                                                                       monkeypatch):
    case = "in place, external data"
    args = make(case, tmp_path)
    with monkeypatch.context() as patch:
        FailAt(patch, 3, only="replace")  # TMP, the model reading it, then DATA: fails
        result = cli("fold", *args)
    assert result.exit_code == 0, result.output
    assert check_consistent(case, tmp_path, {}) == "new"
    (tmp_file,) = leftovers(tmp_path)[1]
    assert tmp_file.startswith("weights.bin.bnfold-")
    assert (f"note: the data file is {tmp_file}: moving it to weights.bin failed "
            f"(Input/output error)") in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", tmp_file]  # the old data is removed
    # The next run gives the data its name back.
    assert cli("fold", *args, "-q").exit_code == 0
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "weights.bin"]
    assert check_consistent(case, tmp_path, {}) == "new"


# --- in place --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o600, 0o444, 0o640])
def test_in_place_keeps_mode_owner_and_data_file_name(tmp_path, mode):
    path = external_model(tmp_path, "m.onnx", "weights.bin")
    (tmp_path / "m.onnx.data").write_bytes(b"someone else's file")
    for name in ("m.onnx", "weights.bin"):
        os.chmod(tmp_path / name, mode)
        if os.geteuid() == 0:
            os.chown(tmp_path / name, 1234, 5678)
    result = cli("fold", path, "--in-place", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data", "weights.bin"]
    assert (tmp_path / "m.onnx.data").read_bytes() == b"someone else's file"
    model = onnx.load(path, load_external_data=False)
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    assert {e.value for t in model.graph.initializer for e in t.external_data
            if e.key == "location"} == {"weights.bin"}
    for name in ("m.onnx", "weights.bin"):
        st = os.stat(tmp_path / name)
        assert stat.S_IMODE(st.st_mode) == mode
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (1234, 5678)
    np.testing.assert_allclose(run(path), expected(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("linked", ["m.onnx", "m.onnx.data"])
def test_in_place_refuses_a_hard_linked_input(tmp_path, linked):
    path = external_model(tmp_path)
    os.link(tmp_path / linked, tmp_path / "other-name")
    before = snapshot(tmp_path)
    result = cli("fold", path, "--in-place")
    assert_refused(result, f"{linked}: has 2 hard links", "write with -o instead")
    assert snapshot(tmp_path) == before


def test_output_over_a_hard_link_of_the_input_is_refused(tmp_path):
    path = external_model(tmp_path)
    os.link(path, tmp_path / "alias.onnx")
    before = snapshot(tmp_path)
    assert_refused(cli("fold", path, "-o", tmp_path / "alias.onnx"), "use --in-place")
    assert snapshot(tmp_path) == before


# --- paths that must not be written ----------------------------------------------------------

def _clash_cases():
    d = "{d}"
    fold = ["fold", f"{d}/m.onnx"]
    return {
        # name: (arguments, what the message says)
        "-o is INPUT's data": ([*fold, "-o", f"{d}/m.onnx.data"], "is the data file of INPUT"),
        "-o is INPUT's data via ..": ([*fold, "-o", f"{d}/sub/../m.onnx.data"],
                                      "is the data file of INPUT"),
        "OUTPUT.data is INPUT's data": (["fold", f"{d}/a.onnx", "-o", f"{d}/m.onnx"],
                                        "the output's data file"),
        "OUTPUT.data links to INPUT's data": (["fold", f"{d}/a.onnx", "-o", f"{d}/c.onnx"],
                                              "c.onnx.data: is the data file of INPUT"),
        "--json is INPUT": ([*fold, "-o", f"{d}/o.onnx", "--json", f"{d}/m.onnx"], "is INPUT"),
        "--json is INPUT in place": ([*fold, "--in-place", "--json", f"{d}/m.onnx"], "is INPUT"),
        "--json is INPUT's data": ([*fold, "-o", f"{d}/o.onnx", "--json", f"{d}/m.onnx.data"],
                                   "is the data file of INPUT"),
        "--json is a symlink to INPUT": ([*fold, "-o", f"{d}/o.onnx", "--json", f"{d}/link"],
                                         "is INPUT"),
        "--json is a hard link of INPUT": ([*fold, "-o", f"{d}/o.onnx", "--json",
                                            f"{d}/hard"], "is INPUT"),
        "--json is the output": ([*fold, "-o", f"{d}/o.onnx", "--json", f"{d}/o.onnx"],
                                 "is -o"),
        "--json is the output's data": ([*fold, "-o", f"{d}/o.onnx", "--json",
                                         f"{d}/o.onnx.data"], "is the output's data file"),
        "--json is --inputs": ([*fold, "-o", f"{d}/o.onnx", "--inputs", f"{d}/x.npz", "--json",
                                f"{d}/x.npz"], "is --inputs"),
        "verify --json A": (["verify", f"{d}/m.onnx", f"{d}/b.onnx", "--json", f"{d}/m.onnx"],
                            "is A"),
        "verify --json B's data": (["verify", f"{d}/b.onnx", f"{d}/m.onnx", "--json",
                                    f"{d}/m.onnx.data"], "is the data file of B"),
        "verify --json --inputs": (["verify", f"{d}/m.onnx", f"{d}/b.onnx", "--inputs",
                                    f"{d}/x.npz", "--json", f"{d}/x.npz"], "is --inputs"),
        "inspect --json MODEL": (["inspect", f"{d}/m.onnx", "--json", f"{d}/m.onnx"],
                                 "is MODEL"),
        "inspect --json MODEL's data": (["inspect", f"{d}/m.onnx", "--json",
                                         f"{d}/m.onnx.data"], "is the data file of MODEL"),
        "insert --json INPUT": (["insert", f"{d}/m.onnx", "-o", f"{d}/o.onnx", "--all",
                                 "--json", f"{d}/m.onnx"], "is INPUT"),
        "insert -o INPUT's data": (["insert", f"{d}/m.onnx", "-o", f"{d}/m.onnx.data", "--all"],
                                   "is the data file of INPUT"),
    }


CLASHES = _clash_cases()


@pytest.mark.parametrize("case", CLASHES)
def test_an_output_that_is_an_input_or_another_output_is_refused(tmp_path, case):
    args, message = CLASHES[case]
    external_model(tmp_path)  # m.onnx, m.onnx.data
    save_model(conv_bn(0), tmp_path / "b.onnx")  # b.onnx: a single file
    model = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    onnx.save(model, tmp_path / "a.onnx")  # a.onnx reads m.onnx.data ...
    os.symlink("m.onnx.data", tmp_path / "c.onnx.data")  # ... which is also c.onnx.data
    os.symlink("m.onnx", tmp_path / "link")
    os.link(tmp_path / "m.onnx", tmp_path / "hard")
    (tmp_path / "sub").mkdir()
    np.savez(tmp_path / "x.npz", x=X)
    before = snapshot(tmp_path)
    result = cli(*[a.format(d=tmp_path) for a in args])
    assert_refused(result, message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["fold", "verify", "insert", "inspect"])
def test_json_dash_is_stdout(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    save_model(conv_bn(0), "m.onnx")
    args = {"fold": ["m.onnx", "-o", "o.onnx"], "verify": ["m.onnx", "m.onnx"],
            "insert": ["m.onnx", "-o", "o.onnx", "--op", "Conv"], "inspect": ["m.onnx"]}[command]
    result = cli(command, *args, "--json", "-", *(["-q"] if command != "inspect" else []))
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout), dict)
    assert not os.path.exists("-")


@pytest.mark.parametrize("args, message", [
    (["-o", "-"], "-o -: bnfold writes models to files, not to stdout"),
    (["-o", ""], "-o '': empty file name"),
    (["-o", "{d}/o.onnx", "--json", ""], "--json '': empty file name"),
    (["-o", "/dev/null"], "/dev/null: not a regular file"),
    (["-o", "{d}/" + "n" * 256], "File name too long"),
])
def test_unusable_output_names_are_refused(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    save_model(conv_bn(0), tmp_path / "m.onnx")
    before = snapshot(tmp_path)
    assert_refused(cli("fold", tmp_path / "m.onnx", *[a.format(d=tmp_path) for a in args]),
                   message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("length", [242, 250, 255])
def test_long_output_names_are_written(tmp_path, length):
    path = external_model(tmp_path)
    out = tmp_path / ("o" * (length - 5) + ".onnx")
    result = cli("fold", path, "-o", out, "--json", tmp_path / ("j" * length))
    assert result.exit_code == 0, result.output
    data = out.name[:250] + ".data"  # within NAME_MAX: the data file's name is cut
    assert sorted(os.listdir(tmp_path)) == sorted(["m.onnx", "m.onnx.data", out.name, data,
                                                   "j" * length])
    np.testing.assert_allclose(run(out), expected(0), rtol=1e-4, atol=1e-4)
    # in place too, where the commit takes two steps through a longer temporary name
    result = cli("fold", out, "--in-place", "-q")
    assert result.exit_code == 0, result.output
    assert len(os.listdir(tmp_path)) == 5
    np.testing.assert_allclose(run(out), expected(0), rtol=1e-4, atol=1e-4)


# --- symlinks, pipes, devices ----------------------------------------------------------------

def test_outputs_named_by_symlinks_replace_their_targets(tmp_path):
    path = external_model(tmp_path)
    real, links = tmp_path / "real", tmp_path / "links"
    real.mkdir(), links.mkdir()
    save_model(conv_bn(1), real / "target.onnx", "target.onnx.data")
    save_model(conv_bn(1), real / "single.onnx")
    (real / "report.json").write_text("{}")
    os.symlink("target.onnx", real / "latest.onnx")
    os.symlink("../real/single.onnx", links / "single.onnx")
    os.symlink("../real/report.json", links / "report.json")
    os.symlink("../real/new.onnx", links / "dangling.onnx")
    result = cli("fold", path, "-o", real / "latest.onnx", "--json", links / "report.json", "-q")
    assert result.exit_code == 0, result.output
    assert os.readlink(real / "latest.onnx") == "target.onnx"
    assert os.readlink(links / "report.json") == "../real/report.json"
    assert json.loads((real / "report.json").read_text())["folded"] == 1
    assert sorted(os.listdir(real)) == ["latest.onnx", "report.json", "single.onnx",
                                        "target.onnx", "target.onnx.data"]
    np.testing.assert_allclose(run(real / "latest.onnx"), expected(0), rtol=1e-4, atol=1e-4)
    assert [n.op_type for n in onnx.load(real / "target.onnx").graph.node] == ["Conv"]
    # into another folder (a single-file model: loaders look for data beside the link), and
    # through a dangling link, whose target is created
    save_model(conv_bn(0), tmp_path / "s.onnx")
    for link in ("single.onnx", "dangling.onnx"):
        assert cli("fold", tmp_path / "s.onnx", "-o", links / link, "-q").exit_code == 0
        assert os.path.islink(links / link)
        np.testing.assert_allclose(run(links / link), expected(0), rtol=1e-4, atol=1e-4)
    assert sorted(os.listdir(links)) == ["dangling.onnx", "report.json", "single.onnx"]
    assert sorted(os.listdir(real))[:2] == ["latest.onnx", "new.onnx"]


def test_json_to_a_fifo_or_a_device_is_written_directly(tmp_path):
    save_model(conv_bn(0), tmp_path / "m.onnx")
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    result = cli("fold", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--json", fifo, "-q")
    reader.join(timeout=30)
    assert result.exit_code == 0, result.output
    assert json.loads(received[0])["folded"] == 1
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    result = cli("fold", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--json",
                    "/dev/null", "-q")
    assert result.exit_code == 0, result.output
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert not any(n.startswith(".bnfold-") for n in os.listdir("/dev"))


def test_json_to_dev_stdout_writes_to_stdout_and_leaves_the_link(tmp_path):
    # As root, /dev/stdout (a symlink) used to be replaced by a regular file.
    save_model(conv_bn(0), tmp_path / "m.onnx")
    before = os.readlink("/dev/stdout")
    done = subprocess.run([sys.executable, "-m", "bnfold", "fold", str(tmp_path / "m.onnx"),
                           "-o", str(tmp_path / "o.onnx"), "--json", "/dev/stdout", "-q"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["folded"] == 1
    assert os.readlink("/dev/stdout") == before


@pytest.mark.parametrize("command", [["fold", "{fifo}", "-o", "{d}/o.onnx"],
                                     ["verify", "{d}/m.onnx", "{fifo}"],
                                     ["inspect", "{fifo}"],
                                     ["fold", "{d}/m.onnx", "-o", "{d}/o.onnx", "--inputs",
                                      "{fifo}"]])
def test_a_fifo_as_input_is_refused_without_waiting(tmp_path, command):
    save_model(conv_bn(0), tmp_path / "m.onnx")
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    result = cli(*[a.format(d=tmp_path, fifo=fifo) for a in command])  # would hang on open
    assert_refused(result, "in.fifo: not a regular file (a named pipe)")


# --- errors in what is read -------------------------------------------------------------------

@pytest.mark.parametrize("key, value, message", [
    ("length", "100", "length 100 bytes, but its shape [16, 8, 3, 3] needs 4608"),
    ("offset", "-4", "offset '-4' is not a non-negative integer"),
    ("offset", "1.5", "offset '1.5' is not a non-negative integer"),
    ("length", "lots", "length 'lots' is not a non-negative integer"),
])
def test_bad_external_data_references_are_bad_input(tmp_path, key, value, message):
    path = external_model(tmp_path)
    model = onnx.load(path, load_external_data=False)
    weight = next(t for t in model.graph.initializer if t.name == "W")
    entries = {e.key: e for e in weight.external_data}
    if key not in entries:
        entries[key] = weight.external_data.add(key=key)
    entries[key].value = value
    onnx.save(model, path)
    assert_refused(cli("fold", path, "-o", tmp_path / "o.onnx"), str(path),
                   "tensor 'W'", message)
    assert_refused(cli("inspect", path), message)


@pytest.mark.parametrize("content, message", [
    (None, "array 'x' holds Python objects"),
    (b"", "empty file"),
    (b"not an archive", "cannot read inputs"),
])
@pytest.mark.parametrize("command", ["fold", "verify"])
def test_unusable_inputs_files_are_bad_input(tmp_path, content, message, command):
    save_model(conv_bn(0), tmp_path / "m.onnx")
    inputs = tmp_path / "x.npz"
    if content is None:
        np.savez(inputs, x=np.array([{"a": 1}, None], dtype=object))
    else:
        inputs.write_bytes(content)
    args = ["-o", tmp_path / "o.onnx"] if command == "fold" else [tmp_path / "m.onnx"]
    result = cli(command, tmp_path / "m.onnx", *args, "--inputs", inputs)
    assert_refused(result, str(inputs), message)
    assert "Aborted" not in result.output
    assert not (tmp_path / "o.onnx").exists()


# --- full disks ------------------------------------------------------------------------------

class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def test_a_full_disk_names_the_output(tmp_path, monkeypatch):
    save_model(conv_bn(0), tmp_path / "m.onnx")
    monkeypatch.setattr(bnfold.serialize, "open", lambda *a, **k: _FullDisk(open(*a, **k)),
                        raising=False)
    result = cli("fold", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx")
    assert_refused(result, f"{tmp_path / 'o.onnx'}: cannot write in {tmp_path}: No space left "
                           f"on device")
    assert os.listdir(tmp_path) == ["m.onnx"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (root only; skipped elsewhere)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # a failed run may hold files


def big_external_model(directory) -> str:
    """A model whose weight (147 KB) does not fit on the tiny disk."""
    model = conv_bn(0)
    wide = np.random.default_rng(0).normal(size=(16, 8, 17, 17)).astype(np.float32)
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(wide, "W"))
    model.graph.node[0].attribute[0].ints[:] = [8, 8, 8, 8]  # pads keep the 5x5 output
    path = os.path.join(directory, "big.onnx")
    save_model(model, path, "big.onnx.data")
    return path


def test_a_full_output_disk_names_the_output_and_leaves_nothing(tmp_path, tiny_disk):
    path = big_external_model(tmp_path)
    result = cli("fold", path, "-o", tiny_disk / "o.onnx")
    assert_refused(result, f"{tiny_disk / 'o.onnx'}: cannot write", f"in {tiny_disk}",
                   "No space left on device")
    assert os.listdir(tiny_disk) == []


def test_a_full_tmpdir_is_named(tmp_path, tiny_disk, monkeypatch):
    path = big_external_model(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tiny_disk))
    result = cli("fold", path, "--dry-run")  # no output folder: weights wait in TMPDIR
    assert_refused(result, f"cannot write scratch weights in {tiny_disk}/bnfold-",
                   "No space left on device (that is TMPDIR: set TMPDIR to a folder with room)")


# --- scratch files and leftovers -------------------------------------------------------------

@pytest.mark.parametrize("data", ["m.onnx.data", None])
def test_new_weights_wait_in_the_output_folder_not_in_tmpdir(tmp_path, monkeypatch, data):
    monkeypatch.setattr(bnfold.cli.fold, "_SPILL_ABOVE", -1)  # as for a large model
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    save_model(conv_bn(0), tmp_path / "m.onnx", data)
    seen = []
    real_verify = bnfold.cli.fold.verify

    def verify(reference, candidate, **kwargs):
        folder = os.path.dirname(os.path.dirname(candidate))
        seen.append((sorted(os.listdir(folder)), os.listdir(tmpdir)))
        return real_verify(reference, candidate, **kwargs)

    monkeypatch.setattr(bnfold.cli.fold, "verify", verify)
    out = tmp_path / "o.onnx"
    assert cli("fold", tmp_path / "m.onnx", "-o", out, "-q").exit_code == 0
    (in_folder, in_tmpdir), = seen
    assert in_tmpdir == []  # (bnfold imports onnxruntime, which writes TMPDIR/.ses, earlier)
    assert in_folder[0] == "m" and in_folder[1].startswith("weights-")  # the spilled weights
    assert os.listdir(tmpdir) == [] and leftovers(tmp_path) == ([], [])
    np.testing.assert_allclose(run(out), expected(0), rtol=1e-4, atol=1e-4)


def test_a_small_single_file_model_keeps_its_new_weights_in_memory(tmp_path, monkeypatch):
    """Under bnfold.cli.fold._SPILL_ABOVE (64 MB), no scratch file: the stage holds the model
    only, and `save` writes it in one buffer."""
    save_model(conv_bn(0), tmp_path / "m.onnx")
    seen = []
    real_verify = bnfold.cli.fold.verify

    def verify(reference, candidate, **kwargs):
        folder = os.path.dirname(os.path.dirname(candidate))
        seen.append(sorted(os.listdir(folder)))
        return real_verify(reference, candidate, **kwargs)

    monkeypatch.setattr(bnfold.cli.fold, "verify", verify)
    out = tmp_path / "o.onnx"
    assert cli("fold", tmp_path / "m.onnx", "-o", out, "-q").exit_code == 0
    assert seen == [["m"]]
    assert leftovers(tmp_path) == ([], [])
    np.testing.assert_allclose(run(out), expected(0), rtol=1e-4, atol=1e-4)


def test_a_run_sweeps_what_killed_runs_left_and_spares_live_ones(tmp_path):
    path = external_model(tmp_path)
    dead = tmp_path / ".bnfold-deadbeef"
    (dead / "m").mkdir(parents=True)
    (dead / "m" / "o.onnx.data").write_bytes(b"half a file")
    (tmp_path / "o.onnx.data.bnfold-deadbeef").write_bytes(b"data no model reads")
    live = tmp_path / ".bnfold-alive123"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running bnfold holds its folder
    try:
        assert cli("fold", path, "-o", tmp_path / "o.onnx", "-q").exit_code == 0
        assert sorted(os.listdir(tmp_path)) == [".bnfold-alive123", "m.onnx", "m.onnx.data",
                                                "o.onnx", "o.onnx.data"]
    finally:
        os.close(fd)


def test_api_save_refuses_to_overwrite_the_data_it_reads(tmp_path):
    path = external_model(tmp_path, "a.onnx", "b.onnx.data")
    model = bnfold.load(path)
    before = snapshot(tmp_path)
    with pytest.raises(bnfold.BadInput, match="b.onnx.data: is a file bnfold reads"):
        save(model, tmp_path / "b.onnx", base_dir=str(tmp_path))
    assert snapshot(tmp_path) == before
    written = save(model, path, base_dir=str(tmp_path), data_name="b.onnx.data")  # in place
    assert written.data == "b.onnx.data" and written.notes == []
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "b.onnx.data"]
    np.testing.assert_allclose(run(path), expected(0), rtol=1e-6)


def test_a_folder_one_may_write_but_not_list_takes_the_output(tmp_path, monkeypatch):
    save_model(conv_bn(0), tmp_path / "m.onnx", "m.onnx.data")
    drop = tmp_path / "drop"
    drop.mkdir()
    real_open = os.open

    def no_listing(path, flags, *args, **kwargs):  # as for others in a 0333 folder
        if os.fspath(path) == str(drop) and flags & os.O_DIRECTORY:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_listing)
    assert cli("fold", tmp_path / "m.onnx", "-o", drop / "o.onnx", "-q").exit_code == 0
    monkeypatch.undo()
    assert sorted(os.listdir(drop)) == ["o.onnx", "o.onnx.data"]
    np.testing.assert_allclose(run(drop / "o.onnx"), expected(0), rtol=1e-4, atol=1e-4)
