"""What the commands share: error reporting and signals, the paths a command reads and writes,
options, progress, reports."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import click
import onnx

from bnfold.commit import data_file, defer_if_held, write_file
from bnfold.errors import BadInput, BnfoldError, Stopped, VerificationFailed, one_line
from bnfold.io import data_name, external_files, load, load_inputs
from bnfold.paths import identity, resolve
from bnfold.report import FoldReport, VerifyReport


EXIT_STRICT = 3  # fold --strict: a batch norm was kept


SCHEMA_VERSION = 1  # of the JSON reports (docs/JSON.md, docs/report.schema.json)


class Failure(click.ClickException):
    exit_code = 2  # 1 for VerificationFailed

    def show(self, file=None) -> None:
        click.echo(f"bnfold: error: {self.message}", err=True)


class ReportsErrors:
    """Mixin for click commands and groups: bnfold's errors and file errors become one line on
    stderr and exit code 2 (1 for a failed verification), never a traceback; SIGINT and
    SIGTERM unwind (temporary files are removed on the way) and exit 130 and 143."""

    def invoke(self, ctx: click.Context):
        with _signals_stop():
            try:
                return super().invoke(ctx)
            except (Stopped, KeyboardInterrupt) as stop:
                if not isinstance(stop, Stopped):
                    stop = Stopped(signal.SIGINT)
                click.echo(f"bnfold: {stop}", err=True)
                raise click.exceptions.Exit(stop.exit_code) from None
            except click.exceptions.Exit:
                raise
            except Exception as err:
                stop = _stopped_within(err)
                if stop is not None:  # e.g. a signal during `import onnxruntime`, which
                    click.echo(f"bnfold: {stop}", err=True)  # wraps it in an ImportError
                    raise click.exceptions.Exit(stop.exit_code) from None
                if not isinstance(err, (BnfoldError, OSError)):
                    raise
                failure = Failure(one_line(err))
                failure.exit_code = 1 if isinstance(err, VerificationFailed) else 2
                raise failure from err


def _stopped_within(err: BaseException) -> Stopped | None:
    """The `Stopped` an exception was raised from or during, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, Stopped):
            return err
        if isinstance(err, KeyboardInterrupt):
            return Stopped(signal.SIGINT)
        seen.add(id(err))
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


class Command(ReportsErrors, click.Command):
    """A bnfold subcommand: works in the `bnfold` group and on its own."""


@contextmanager
def _signals_stop() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Stopped` in the main thread (unless ignored, as in a
    background job), so `finally` blocks remove temporary files before the process exits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        if not defer_if_held(signum):
            raise Stopped(signum)

    previous = {}
    for signum, default in ((signal.SIGINT, signal.default_int_handler),
                            (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) is default:
            previous[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --in-place, as fold, insert and calibrate give it
in_place_option = click.option(
    "--in-place", is_flag=True,
    help="Overwrite INPUT (and its data file, keeping its name when it lies beside INPUT; one "
         "in a subfolder is left as it is, and INPUT gets INPUT.data).")


def verify_options(command: Callable) -> Callable:
    """The options of the equivalence check, shared by `fold` and `verify`."""
    options = [
        click.option("--inputs", metavar="FILE.npz",
                     help="Compare on these inputs (name -> array) instead of random ones."),
        click.option("--dim", "dims", multiple=True, metavar="NAME=VALUE",
                     help="Size of a symbolic input dimension, in every draw (repeatable) "
                          "[default: draw 1, distinct primes 2, 3, 5, ... that no dimension of "
                          "the model has; draw 2, 1]."),
        click.option("--atol", multiple=True, metavar="[OUTPUT=]VALUE", callback=_tolerance,
                     help="Pass when |B - A| <= atol + rtol * |A| everywhere, instead of the "
                          "default test (B as accurate as A against a float64 evaluation of A). "
                          "OUTPUT=VALUE sets it for one output only (repeatable); the others "
                          "keep the plain VALUE, or the default test."),
        click.option("--rtol", multiple=True, metavar="[OUTPUT=]VALUE", callback=_tolerance,
                     help="Relative tolerance of that test (the one not given: by dtype); "
                          "OUTPUT=VALUE as for --atol."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the random inputs."),
        click.option("--runs", type=click.IntRange(min=1), default=2, show_default=True,
                     help="Draws of random inputs (1: dims primes, floats normal; 2: dims 1, "
                          "floats 0..255; then again with new seeds)."),
        click.option("-v", "--verbose", is_flag=True,
                     help="Let onnxruntime's own log lines through to stderr."),
        click.option("--json", "json_path", metavar="PATH",
                     help="Also write the report as JSON ('-': to stdout)."),
        click.option("-q", "--quiet", is_flag=True, help="Print errors only."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _tolerance(ctx: click.Context, param: click.Parameter,
               specs: tuple[str, ...]) -> float | dict[str, float] | None:
    """--atol/--rtol: VALUE for every output, OUTPUT=VALUE for one; a float, or a dict by output
    name whose key "*" holds the plain VALUE (verify's per-output form), or None."""
    values: dict[str, float] = {}
    for spec in specs:
        name, _, text = spec.rpartition("=")
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value >= 0:  # also NaN
            raise BadInput(f"--{param.name} {spec}: expected VALUE or OUTPUT=VALUE, "
                           f"VALUE a non-negative number")
        values[name or "*"] = value
    if not values:
        return None
    return values["*"] if list(values) == ["*"] else values


def parse_dims(specs: tuple[str, ...]) -> dict[str, int] | None:
    sizes = {}
    for spec in specs:
        match = re.fullmatch(r"([^=]+)=([0-9]+)", spec)
        if not match or int(match[2]) < 1:
            raise BadInput(f"--dim {spec}: expected NAME=VALUE, VALUE a positive integer")
        sizes[match[1]] = int(match[2])
    return sizes or None


def exit_failed(verification: VerifyReport, quiet: bool, outcome: str) -> None:
    report_failed(verification, quiet, outcome)
    click.get_current_context().exit(1)


def report_failed(verification: VerifyReport, quiet: bool, outcome: str) -> None:
    click.echo(f"bnfold: verification failed, {outcome}", err=True)
    if quiet:  # the report was not printed, but errors always are
        for failure in verification.failures:
            click.echo("  " + failure.describe(), err=True)


def progress_reporter(quiet: bool) -> Callable[[str], None]:
    """Tell a person at a terminal about slow steps; say nothing to pipelines."""
    if quiet or not sys.stderr.isatty():
        return lambda step: None
    return lambda step: click.echo(click.style(f"bnfold: {step}...", dim=True), err=True)


# --- paths ---------------------------------------------------------------------------------------

@dataclass
class Paths:
    """The files a command reads and the files it writes, checked before any work: an output
    may not be an input, an input's data file or another output (the same file however
    named: symlinks, hard links, `..`)."""

    reads: dict[str, str] = field(default_factory=dict)  # what the user calls it -> path
    writes: dict[str, str] = field(default_factory=dict)

    def read(self, label: str, path: str | None) -> None:
        if path:
            self.reads[label] = path

    def read_model(self, label: str, path: str, model: onnx.ModelProto) -> None:
        """`model`, loaded from `path`, and its data files."""
        self.read(label, path)
        for file in external_files(model, os.path.dirname(os.path.abspath(path))):
            self.read(f"the data file of {label} ({os.path.basename(file)})", file)

    def write(self, label: str, path: str | None) -> None:
        """Resolve an output (BadInput if it cannot be written) and check it against the rest."""
        if path is None or (path == "-" and label == "--json"):
            return
        if resolve(path, label).special and label != "--json":
            raise BadInput(f"{label} {path}: not a regular file; bnfold writes models to files")
        mine = identity(path)
        for other_label, other in {**self.reads, **self.writes}.items():
            if identity(other) == mine:
                raise BadInput(f"{label} {path}: is {other_label}")
        self.writes[label] = path

    @property
    def inputs(self) -> list[str]:
        return list(self.reads.values())


def output_path(input_path: str, output: str | None, in_place: bool,
                dry_run: bool) -> str | None:
    if output == "-":
        raise BadInput("-o -: bnfold writes models to files, not to stdout; give a file name")
    if output == "":
        raise BadInput("-o '': empty file name")
    if in_place:
        if output and identity(input_path) != identity(output):
            raise BadInput("--in-place overwrites INPUT: leave out -o")
        return input_path
    if output is None:
        if dry_run:
            return None
        raise BadInput("no output: give -o OUTPUT, --in-place or --dry-run")
    if identity(input_path) == identity(output):
        raise BadInput(f"{output}: this is the input; use --in-place to overwrite it")
    return output


@dataclass
class Job:
    """A fold or insert run, checked and loaded: where it writes, what it must not touch."""

    output: str | None
    progress: Callable[[str], None]
    base_dir: str
    model: onnx.ModelProto
    data_name: str | None  # in place: the data file name INPUT uses, kept
    protect: list[str]  # files the model's commit may not replace: the inputs, unless in place
    reads: list[str]  # every file the run reads: no report replaces them


def load_job(input_path: str, output: str | None, in_place: bool, dry_run: bool,
             json_path: str | None, quiet: bool, inputs: str | None = None) -> Job:
    """Check where results go before any work, then load INPUT (its external data stays on
    disk) and check again against its data files."""
    output = output_path(input_path, output, in_place, dry_run)
    writes = None if dry_run else output
    base_dir = os.path.dirname(os.path.abspath(input_path))

    def check(model: onnx.ModelProto | None) -> Paths:
        paths = Paths()
        paths.read("--inputs", inputs)
        if model is None:
            paths.read("INPUT", input_path)
        else:
            paths.read_model("INPUT", input_path, model)
        if in_place:
            resolve(input_path, "--in-place")  # its folder must be writable
        else:
            paths.write("-o", writes)
            if model is not None and writes and external_files(model, base_dir):
                paths.write("the output's data file", data_file(writes))
        paths.write("--json", json_path)
        return paths

    check(None)
    progress = progress_reporter(quiet)
    if inputs:
        load_inputs(inputs)  # its errors before the work, not after the fold
    model = load(input_path, progress=progress)
    paths = check(model)
    if in_place and writes:
        _refuse_hard_links(input_path, model, base_dir)
    # In place, INPUT and its data are the destination; the commit keeps them consistent.
    protect = [p for p in [inputs] if p] if in_place else paths.inputs
    return Job(writes, progress, base_dir, model, data_name(model) if in_place else None,
               protect, paths.inputs)


def reads_of(*models: tuple[str, str, onnx.ModelProto], inputs: str | None = None) -> Paths:
    """The files of `verify` and `inspect`: each (label, path, model) and the --inputs file."""
    paths = Paths()
    paths.read("--inputs", inputs)
    for label, path, model in models:
        paths.read_model(label, path, model)
    return paths


def _refuse_hard_links(input_path: str, model: onnx.ModelProto, base_dir: str) -> None:
    """--in-place replaces a file by renaming a new one over it: every other name of it (a
    hard link) would silently keep the old content."""
    for path in [input_path, *external_files(model, base_dir)]:
        links = os.stat(path).st_nlink
        if links > 1:
            raise BadInput(f"{path}: has {links} hard links; --in-place would replace only this "
                           f"one (the others keep the old content): write with -o instead")


def emit(report, json_path: str | None, quiet: bool, protect: list[str] = (),
         run: RunInfo | None = None) -> None:
    """The report: as text on stderr (unless quiet), as JSON to `json_path` ('-': stdout),
    after `run`'s fields (docs/JSON.md)."""
    if json_path:
        write_json({**run.to_dict(), **report.to_dict()} if run else report.to_dict(),
                   json_path, protect)
    if not quiet:
        click.echo(report.to_text(), err=True)


def write_json(data: dict, json_path: str, protect: list[str] = ()) -> None:
    text = json.dumps(data, indent=2)
    if json_path == "-":
        click.echo(text)
    else:
        write_file(json_path, (text + "\n").encode(), protect=protect)


def note_written(report: FoldReport, written) -> None:
    """Add what the commit said (data file kept under another name...) to the report."""
    if written is not None:
        report.notes.extend(f"note: {note}" for note in written.notes)


def model_size(path: str, model: onnx.ModelProto, base_dir: str) -> int:
    """Bytes of a model file and of the data files it reads."""
    return os.path.getsize(path) + sum(os.path.getsize(f) for f in external_files(model, base_dir)
                                       if os.path.exists(f))


def written_size(written) -> int | None:
    """Bytes of what a commit wrote: the model file and its data file."""
    if written is None:
        return None
    size = os.path.getsize(written.path)
    if written.data:
        size += os.path.getsize(os.path.join(os.path.dirname(os.path.abspath(written.path)),
                                             written.data))
    return size


# --- what every JSON report starts with ----------------------------------------------------------

def versions() -> dict[str, str]:
    """bnfold's, onnx's and onnxruntime's versions. onnxruntime is not imported for it (a
    command that runs no check never loads it): its version is its distribution's."""
    from bnfold import __version__
    return {"bnfold": __version__, "onnx": onnx.__version__, "onnxruntime": _onnxruntime()}


def _onnxruntime() -> str:
    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"].__version__
    from importlib import metadata
    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-training",
                 "onnxruntime-training-cpu", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    import onnxruntime
    return onnxruntime.__version__


@dataclass
class RunInfo:
    """The head of a command's JSON report: schema version, versions, the paths read and
    written, seconds per step (docs/JSON.md)."""

    command: str
    input: str | None = None
    output: str | None = None
    extra: dict = field(default_factory=dict)  # e.g. verify's "candidate"
    steps: dict[str, float | None] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = (self.steps.get(name) or 0.0) + time.perf_counter() - start

    def to_dict(self) -> dict:
        timings = {name: None if s is None else round(s, 6) for name, s in self.steps.items()}
        timings["total"] = round(time.perf_counter() - self.started, 6)
        return {"schema_version": SCHEMA_VERSION, "command": self.command,
                "versions": versions(), "input": self.input, "output": self.output,
                **self.extra, "timings": timings}
