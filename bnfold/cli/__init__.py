"""The `bnfold` command line: one module per command, each a thin layer over the Python API.

Only this package prints. Reports go to stderr, so stdout stays clean for pipelines.
"""

from __future__ import annotations

import click

from bnfold import __version__
from bnfold.cli.artifacts import artifacts_command
from bnfold.cli.calibrate import calibrate_command
from bnfold.cli.common import ReportsErrors
from bnfold.cli.fold import fold_command
from bnfold.cli.insert import insert_command
from bnfold.cli.inspect import inspect_command
from bnfold.cli.verify import verify_command


class _Group(ReportsErrors, click.Group):
    pass


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnfold")
def main() -> None:
    """Fold BatchNormalization into neighbouring layers of ONNX models, exactly.

    Results are checked with onnxruntime before they are written.

    Exit codes: 0 success, 1 verification failed, 2 bad input or usage.
    3: a batch norm was kept (fold --strict).

    Stopped by a signal: 130 (SIGINT, Ctrl-C) or 143 (SIGTERM), temporary files removed.
    Outputs are written under temporary names, then renamed into place: whatever fails,
    each output holds the old or the new complete model, and the input is never lost.
    """


for _command in (fold_command, verify_command, inspect_command, insert_command,
                 calibrate_command):
    main.add_command(_command)
main.add_command(artifacts_command)  # onnxruntime-training's; needs its own environment

__all__ = ["main"]
