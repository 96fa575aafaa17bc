"""The commit protocol: how bnfold writes every file (model, its data file, JSON report).

Everything is written under temporary names in one folder, `.bnfold-XXXXXXXX`, in the folder
of the destination's real path (a symlink stays a symlink: its target is replaced), fsynced,
and renamed into place. With a data file, the model file is the commit point: a model only
ever names data that is complete and its own. DATA is `<MODEL>.data` (or, in place, the name
the model already uses); TMP is `DATA.bnfold-XXXXXXXX`:

    no model at MODEL reads DATA:  data -> DATA; model -> MODEL (commit)
    the model at MODEL reads DATA (in place, or over an older output): data -> TMP; model
        reading TMP -> MODEL (commit); a copy of the data -> DATA; model reading DATA ->
        MODEL; unlink TMP

then the old data is removed. At every instant MODEL holds a complete model, old or new,
whose data is where it says, whatever fails or is killed. A failure before the commit removes
what was written; one after it (in the second step) keeps the committed model reading TMP and
says so. Commits to one folder take turns (flock on the folder), so concurrent runs leave one
complete result, and a commit sweeps away what killed runs left there (a folder no live
process locks; a TMP no model reads). SIGINT and SIGTERM wait while the renames run.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import onnx

from bnfold.errors import BadInput, Stopped, write_failure
from bnfold.graph import is_external
from bnfold.paths import Target, identity, name_max, resolve, truncate
from bnfold.serialize import write_model
from bnfold.wire import is_plain_name, locations, tensors

_PREFIX = ".bnfold-"
_FOLDER = re.compile(r"\.bnfold-[a-z0-9_]{8}")  # tempfile.mkdtemp's random part: 8 of [a-z0-9_]
_TMP_SUFFIX = re.compile(r"(.+)\.bnfold-[a-z0-9_]{8}")
_MODEL_DIR = "m"  # the staged model and its data, under their final names
_REFERENCES_READ_UP_TO = 64 << 20  # a larger model file is not read to find its data files


def data_file(path: str | os.PathLike, data_name: str | None = None) -> str:
    """The data file a model saved at `path` would use (when it needs one)."""
    target = resolve(path)
    return os.path.join(target.directory, _data_name(target, data_name))


@dataclass
class Written:
    """What a commit left in place: the model (or report) file, its data file name, and notes
    for the user about anything that did not go as planned (the files are consistent anyway)."""

    path: str
    data: str | None = None
    notes: list[str] = field(default_factory=list)


class Stage:
    """A file on its way to `path` (see `staged`): write it at `.path`, then `commit`.

    `.path` is in the stage's folder under the destination's own name; `save` puts the data
    file beside it under its final name, so the staged model reads its data as it will in
    place. `.folder` may hold other scratch files (the fold pass's spilled weights): it is
    removed with the stage. Files in `protect` are never replaced or removed.
    """

    def __init__(self, path: str | os.PathLike, *, data_name: str | None = None,
                 protect: Iterable[str | os.PathLike] = ()):
        self.target = resolve(path, "")
        if self.target.special:
            raise BadInput(f"{self.target.given}: not a regular file; bnfold writes models to "
                           f"files")
        self.data_name = _data_name(self.target, data_name)
        self._protect = {identity(p) for p in protect}
        self._reads: set[tuple] = set()  # files the staged model was made from
        self._created: list[str] = []  # files outside the folder to remove if the commit fails
        self._old_refs: set[str] | None = set()  # the data files of the model it replaced
        self._lock_fd: int | None = None
        self.folder: str | None = None
        self.discarded = False
        self.written: Written | None = None
        # Made while no commit here runs (they sweep unlocked folders), and locked while this
        # process lives: a later run sweeps the folder only once this one died.
        try:
            with _directory_lock(self.target.directory), _signals_held():
                try:
                    self.folder = tempfile.mkdtemp(prefix=_PREFIX, dir=self.target.directory)
                except OSError as err:
                    raise write_failure(err, self.target.given, self.target.directory) from None
                try:
                    self._lock_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:  # no flock here: then no run sweeps here either
                        pass
                    os.mkdir(os.path.join(self.folder, _MODEL_DIR))
                except OSError as err:
                    self.close()
                    raise write_failure(err, self.target.given, self.target.directory) from None
        except BaseException:  # a signal held while the folder was made arrives here
            self.close()
            raise
        self.path = os.path.join(self.folder, _MODEL_DIR, self.target.name)
        self._tmp_data = _tmp_name(self.data_name, os.path.basename(self.folder)[len(_PREFIX):],
                                   name_max(self.target.directory))

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def save(self, model: onnx.ModelProto, *, base_dir: str | os.PathLike | None = None,
             external_data: bool | None = None) -> None:
        """Write `model` (and its data file, when it needs one) to the stage; see
        `bnfold.serialize.write_model`."""
        base = None if base_dir is None else os.fspath(base_dir)
        if base is not None:
            self._reads |= {identity(os.path.join(base, n)) for n in locations(model)
                            if not os.path.isabs(n)}
        try:
            write_model(model, self.path, data_name=self.data_name, base_dir=base,
                        external_data=external_data)
        except OSError as err:
            if err.filename is not None and not os.fspath(err.filename).startswith(self.folder):
                raise  # reading the input failed: its own message names it
            raise write_failure(err, self.target.given, self.target.directory) from None

    def write_bytes(self, data: bytes) -> None:
        """Stage a plain file (a report)."""
        try:
            with open(self.path, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise write_failure(err, self.target.given, self.target.directory) from None

    def discard(self) -> None:
        """Remove the temporaries; leaving the block then writes nothing."""
        self.discarded = True
        self.close()

    def close(self) -> None:
        with _signals_held():
            for path in self._created:  # written outside the folder by a commit that failed
                _remove(path)
            self._created = []
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
                self.folder = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # after the removal: no run sweeps it meanwhile
                self._lock_fd = None

    def commit(self) -> Written:
        """Rename the staged file(s) into place (see the module's docstring)."""
        staged_dir = os.path.join(self.folder, _MODEL_DIR)
        names = sorted(os.listdir(staged_dir))
        if self.target.name not in names:
            raise ValueError(f"nothing was written to {self.path}")
        data = [n for n in names if n != self.target.name]
        if len(data) > 1:
            raise ValueError(f"the stage holds more than one data file: {data}")
        data_name = data[0] if data else None
        switch = copy = None
        try:
            if data_name is not None:  # the model of the first step reads the data under TMP
                switch = os.path.join(self.folder, "switch.onnx")
                _relocated(self.path, data_name, self._tmp_data, switch)
                if self._two_steps(data_name):  # the copy for DATA, made before taking turns
                    copy = _copied(os.path.join(staged_dir, data_name),
                                   os.path.join(self.folder, "copy.data"))
            with _directory_lock(self.target.directory) as (fd, locked), _signals_held():
                written = self._commit(data_name, switch, copy)
                self._tidy(written, data_name, sweep=locked)
                try:
                    if fd is not None:
                        os.fsync(fd)  # the renames themselves reach the disk
                except OSError:
                    pass
        except OSError as err:  # nothing was committed: `close` removes what was renamed
            raise write_failure(err, self.target.given, self.target.directory) from None
        return written

    def _two_steps(self, data_name: str) -> bool:
        """Whether the model now at the destination reads DATA (so DATA cannot change first)."""
        if _file_stat(os.path.join(self.target.directory, data_name)) is None:
            return False
        refs = _references(self.target.real, _file_stat(self.target.real))
        return refs is None or data_name in refs

    def _commit(self, data_name: str | None, switch: str | None, copy: str | None) -> Written:
        final, directory = self.target.real, self.target.directory
        model = self.path
        old = _file_stat(final)
        if identity(final) in self._protect | self._reads:
            raise BadInput(f"{self.target.given}: is a file bnfold reads; not overwritten")
        self._old_refs = _references(final, old)
        written = Written(self.target.given)
        for path in (model, switch):
            if path and old:
                _adopt(path, old, written.notes)
        if data_name is None:
            os.replace(model, final)
            return written
        data_path = os.path.join(directory, data_name)
        staged_data = os.path.join(self.folder, _MODEL_DIR, data_name)
        old_data = _file_stat(data_path)
        two_steps = old_data is not None and (self._old_refs is None
                                              or data_name in self._old_refs)
        if old_data is not None and (identity(data_path) in self._protect or (
                identity(data_path) in self._reads and not two_steps)):
            raise BadInput(f"{data_path}: is a file bnfold reads; not overwritten (choose "
                           f"another output name)")
        if old_data:
            _adopt(staged_data, old_data, written.notes)
        if not two_steps:  # nothing reads DATA: it is written first, then the model
            self._created.append(data_path)
            os.replace(staged_data, data_path)
            os.replace(model, final)
            self._created = []
            written.data = data_name
            return written
        # Two steps. No hard link between DATA and TMP: onnx refuses data files that have
        # several (as a "hardlink attack"), so the second step renames a copy.
        tmp_path = os.path.join(directory, self._tmp_data)
        self._created.append(tmp_path)
        os.replace(staged_data, tmp_path)
        os.replace(switch, final)  # the commit: the new model, reading TMP
        self._created = []
        written.data = self._tmp_data
        try:
            if copy is None:  # another run changed the destination meanwhile
                copy = _copied(tmp_path, os.path.join(self.folder, "copy.data"))
            _adopt(copy, old_data, written.notes)
            os.replace(copy, data_path)
            os.replace(model, final)
            written.data = data_name
            os.unlink(tmp_path)
        except OSError as err:
            if written.data == data_name:
                written.notes.append(f"could not remove {self._tmp_data} ({err.strerror})")
            else:
                written.notes.append(f"the data file is {self._tmp_data}: moving it to "
                                     f"{data_name} failed ({err.strerror})")
        return written

    def _tidy(self, written: Written, data_name: str | None, sweep: bool) -> None:
        """After the commit: remove the old data (files named like this output's data that no
        model reads now), and what killed runs left here, if nothing else runs (`sweep`)."""
        directory = self.target.directory
        names = {self.data_name} | ({data_name} if data_name else set())
        limit = name_max(directory)
        doomed = {n for n in (self._old_refs or ())
                  if n in names or any(_is_tmp_of(n, d, limit) for d in names)}
        try:
            entries = [e.name for e in os.scandir(directory)]
        except OSError:
            entries = []
        if sweep:
            doomed |= {n for n in entries for d in names if _is_tmp_of(n, d, limit)}
            for name in entries:
                if _FOLDER.fullmatch(name) and name != os.path.basename(self.folder):
                    _sweep(os.path.join(directory, name))
        for name in sorted(doomed - {written.data}):
            path = os.path.join(directory, name)
            read = identity(path) in self._reads and name not in (self._old_refs or ())
            if not os.path.lexists(path) or identity(path) in self._protect or read:
                continue
            try:
                os.unlink(path)
            except OSError as err:
                written.notes.append(f"could not remove the old data file {name} "
                                     f"({err.strerror})")


@contextmanager
def staged(path: str | os.PathLike, *, data_name: str | None = None,
           protect: Iterable[str | os.PathLike] = ()) -> Iterator[Stage]:
    """Yield a `Stage` for `path`: committed if the block succeeds (unless discarded), its
    temporaries removed either way; `stage.written` then says what was written."""
    stage = Stage(path, data_name=data_name, protect=protect)
    try:
        yield stage
        if not stage.discarded:
            stage.written = stage.commit()
    finally:
        stage.close()


def save(model: onnx.ModelProto, path: str | os.PathLike, *, base_dir: str | None = None,
         external_data: bool | None = None, data_name: str | None = None,
         protect: Iterable[str | os.PathLike] = ()) -> Written:
    """Write `model` to `path` by the commit protocol; `model` itself is left as it was.

    Tensors still external are read relative to `base_dir` and streamed into the data file,
    `<path>.data` (or `data_name`). A model with such tensors, or too large for one protobuf,
    is written with external data (`external_data` True or False decides instead): then every
    in-memory tensor over 1 KiB joins them. Weights the fold pass spilled are streamed either
    way. A file the model reads is never overwritten unless it is the data of the model
    being replaced (saving in place).
    """
    with staged(path, data_name=data_name, protect=protect) as stage:
        stage.save(model, base_dir=base_dir, external_data=external_data)
    return stage.written


def write_file(path: str | os.PathLike, data: bytes, *,
               protect: Iterable[str | os.PathLike] = ()) -> Written:
    """Write a plain file (a report) by the commit protocol; a FIFO, a device or a terminal
    is written directly instead (replacing it would break whoever reads it)."""
    target = resolve(path, "")
    if target.special:
        with open(target.given, "wb") as f:
            f.write(data)
        return Written(target.given)
    with staged(path, protect=protect) as stage:
        stage.write_bytes(data)
    return stage.written


# --- helpers -----------------------------------------------------------------------------------

def _data_name(target: Target, data_name: str | None) -> str:
    limit = name_max(target.directory)
    if data_name and is_plain_name(data_name):
        tmp = _TMP_SUFFIX.fullmatch(data_name)  # a name a failed second step left: take it back
        return tmp[1] if tmp else data_name
    return truncate(target.name, limit - len(".data")) + ".data"


def _tmp_name(data_name: str, tag: str, limit: int) -> str:
    suffix = f"{_PREFIX}{tag}"
    return truncate(data_name, limit - len(suffix)) + suffix


def _is_tmp_of(name: str, data_name: str, limit: int) -> bool:
    base = truncate(data_name, limit - len(_PREFIX) - 8)
    return name.startswith(base) and bool(_FOLDER.fullmatch(name[len(base):]))


def _file_stat(path: str) -> os.stat_result | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _references(path: str, st: os.stat_result | None) -> set[str] | None:
    """The data files the model at `path` reads (empty if it is none, None if too large to
    look: then any data file there may be its)."""
    if st is None:
        return set()
    if st.st_size > _REFERENCES_READ_UP_TO:
        return None
    try:
        with open(path, "rb") as f:
            model = onnx.ModelProto.FromString(f.read())
    except Exception:  # not a model (or unreadable): it reads no data file
        return set()
    return set(locations(model))


def _relocated(source: str, old: str, new: str, out: str) -> None:
    """Write a copy of the (small, external-data) model at `source` reading `new` for `old`."""
    with open(source, "rb") as f:
        model = onnx.ModelProto.FromString(f.read())
    for t in tensors(model):
        if is_external(t):
            for entry in t.external_data:
                if entry.key == "location" and entry.value == old:
                    entry.value = new
    with open(out, "xb") as f:
        f.write(model.SerializeToString())
        f.flush()
        os.fsync(f.fileno())


def _adopt(path: str, old: os.stat_result, notes: list[str]) -> None:
    """Give `path` the mode and owner of the file it replaces."""
    os.chmod(path, stat.S_IMODE(old.st_mode))
    st = os.stat(path)
    if (st.st_uid, st.st_gid) != (old.st_uid, old.st_gid):
        try:
            os.chown(path, old.st_uid, old.st_gid)
        except PermissionError:
            notes.append(f"{os.path.basename(path)}: owner not kept (only root may give files "
                         f"away)")


def _copied(source: str, copy: str) -> str:
    """`source` copied to `copy` (in the kernel where it can), on disk."""
    shutil.copyfile(source, copy)
    with open(copy, "rb") as f:
        os.fsync(f.fileno())
    return copy


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _sweep(folder: str) -> None:
    """Remove a stage folder whose process died (its lock is free); leave live ones."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # alive
    else:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)


@contextmanager
def _directory_lock(directory: str) -> Iterator[tuple[int | None, bool]]:
    """Take turns with other bnfold runs writing in `directory` (flock on it): yields the
    folder's descriptor and whether it is locked (some filesystems have no flock)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # a folder one may write in but not list
        yield None, False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:
            locked = False
        yield fd, locked
    finally:
        os.close(fd)  # and the lock with it


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (then act as usual): the renames of a
    commit and the removal of temporaries are not cut in the middle."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    _held.append(True)
    try:
        yield
    finally:
        _held.pop()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if not _held and _deferred:  # arrived through another thread meanwhile
            signum = _deferred[0]
            _deferred.clear()
            raise Stopped(signum)


# Blocking a signal in the main thread does not keep it from another thread (onnxruntime's):
# there the C handler takes it and Python runs the handler in the main thread, within the block.
_held: list[bool] = []
_deferred: list[int] = []


def defer_if_held(signum: int) -> bool:
    """For a signal handler that raises `Stopped`: inside a held block, note the signal (it is
    raised when the block ends) and say so."""
    if _held:
        _deferred.append(signum)
        return True
    return False
