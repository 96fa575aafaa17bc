"""What the command-line modules share: error reporting, output paths, progress, reports."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import click

from bnfold.errors import BadInput, BnfoldError, VerificationFailed, one_line
from bnfold.io import load, staged
from bnfold.report import FoldReport, VerifyReport


class Failure(click.ClickException):
    exit_code = 2  # 1 for VerificationFailed

    def show(self, file=None) -> None:
        click.echo(f"bnfold: error: {self.message}", err=True)


class ReportsErrors:
    """Mixin for click commands and groups: bnfold's errors and file errors become one line on
    stderr and exit code 2 (1 for a failed verification), never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (BnfoldError, OSError) as err:
            failure = Failure(one_line(err))
            failure.exit_code = 1 if isinstance(err, VerificationFailed) else 2
            raise failure from err


def output_path(input_path: str, output: str | None, in_place: bool,
                 dry_run: bool) -> str | None:
    if in_place:
        if output and not _same_file(input_path, output):
            raise BadInput("--in-place overwrites INPUT: leave out -o")
        return input_path
    if output is None:
        if dry_run:
            return None
        raise BadInput("no output: give -o OUTPUT, --in-place or --dry-run")
    if _same_file(input_path, output):
        raise BadInput(f"{output}: this is the input; use --in-place to overwrite it")
    return output


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_writable(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise BadInput(f"{path}: is a directory")
    if not os.path.isdir(directory):
        raise BadInput(f"{path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise BadInput(f"{path}: directory {directory} is not writable")


def progress_reporter(quiet: bool) -> Callable[[str], None]:
    """Tell a person at a terminal about slow steps; say nothing to pipelines."""
    if quiet or not click.get_text_stream("stderr").isatty():
        return lambda step: None
    return lambda step: click.echo(click.style(f"bnfold: {step}...", dim=True), err=True)


def emit(report: FoldReport | VerifyReport, json_path: str | None, quiet: bool) -> None:
    if json_path:
        with staged(json_path) as stage, open(stage.path, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    if not quiet:
        click.echo(report.to_text(), err=True)


def load_job(input_path: str, output: str | None, in_place: bool, dry_run: bool,
             json_path: str | None, quiet: bool):
    """Check where results go before any work, then load INPUT (its external data stays on
    disk): (output path or None, progress reporter, INPUT's directory, model)."""
    output = output_path(input_path, output, in_place, dry_run)
    for path in (json_path, None if dry_run else output):
        if path:
            check_writable(path)
    progress = progress_reporter(quiet)
    base_dir = os.path.dirname(os.path.abspath(input_path))
    return output, progress, base_dir, load(input_path, progress=progress)
