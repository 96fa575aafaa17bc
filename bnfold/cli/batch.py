"""`bnfold fold A.onnx B.onnx DIR/ ... --output-dir OUT`: many models in one run.

Models are folded one after another in this interpreter, or by `--jobs N` worker processes (each
started once, for the models it gets: every N-th), so a model repository pays interpreter and
onnxruntime start-up once per worker, not once per model. Each model's report is printed when
it is done, in the order given; `--json` gets one summary of the run. The run's exit code is the
worst of the models': 2 (a model could not be read or written) over 1 (a verification failed)
over 3 (--strict and a batch norm kept) over 0.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import signal
import time

import click

from bnfold.cli.common import Paths, RunInfo, write_json
from bnfold.commit import defer_if_held
from bnfold.errors import BadInput, BnfoldError, Stopped, one_line

SEVERITY = (2, 1, 3, 0)  # the run's exit code: the first of these that a model had


def model_files(given: tuple[str, ...]) -> list[str]:
    """The model files named, a folder standing for the .onnx files directly in it (sorted)."""
    files = []
    for path in given:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, name) for name in os.listdir(path)
                           if name.endswith(".onnx") and os.path.isfile(os.path.join(path, name)))
            if not found:
                raise BadInput(f"{path}: a folder with no .onnx file")
            files += found
        else:
            files.append(path)
    return files


def plan_outputs(files: list[str], output_dir: str | None, in_place: bool,
                 dry_run: bool) -> list[str | None]:
    """Where each model goes: OUT/<its file name> (None for --dry-run, itself in place), checked
    before any work: no two models to one file, no output over an input."""
    if in_place and output_dir:
        raise BadInput("--in-place and --output-dir: choose one")
    if not (output_dir or in_place or dry_run):
        raise BadInput("several models: give --output-dir OUT, --in-place or --dry-run")
    if output_dir:
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise BadInput(f"--output-dir {output_dir}: not a folder")
        parent = os.path.dirname(os.path.abspath(output_dir))
        if not os.path.isdir(parent):
            raise BadInput(f"--output-dir {output_dir}: its parent folder does not exist")
    seen: dict[str, str] = {}
    for path in files:
        if path in seen.values():
            raise BadInput(f"{path}: given twice")
        name = os.path.basename(path)
        if name in seen and output_dir:
            raise BadInput(f"{seen[name]} and {path} would both be written to "
                           f"{os.path.join(output_dir, name)}")
        seen[name] = path
    if dry_run:
        return [None] * len(files)
    if in_place:
        return list(files)
    outputs = [os.path.join(output_dir, os.path.basename(path)) for path in files]
    if os.path.isdir(output_dir):  # else: a new folder, nothing in it to clash with
        paths = Paths()
        for path in files:
            paths.read(path, path)
        for path, output in zip(files, outputs):
            paths.write(f"the output of {path}", output)
    return outputs


def run_batch(files: list[str], outputs: list[str | None], in_place: bool, options,
              json_path: str | None, quiet: bool, jobs: int) -> int:
    """Fold every model; print each report when done (in order), write the summary; the exit
    code of the run."""
    if jobs < 1:
        raise BadInput(f"--jobs {jobs}: give 1 or more")
    run = RunInfo("fold", steps={})
    paths = Paths()
    for path in files:
        paths.read(path, path)
    paths.write("--json", json_path)
    if outputs and outputs[0] and not in_place:
        os.makedirs(os.path.dirname(outputs[0]) or ".", exist_ok=True)
    tasks = [(path, output, in_place, options, quiet) for path, output in zip(files, outputs)]
    results = []
    if jobs == 1 or len(tasks) == 1:
        for task in tasks:
            results.append(_show(fold_one(task)))
    else:
        results = [_show(result) for result in _in_workers(tasks, min(jobs, len(tasks)))]
    codes = [code for code, _, _ in results]
    exit_code = next((c for c in SEVERITY if c in codes), 0)
    counts = {"models": len(codes), "ok": codes.count(0), "bad_input": codes.count(2),
              "verification_failed": codes.count(1), "strict_kept": codes.count(3)}
    if json_path:
        summary = {**run.to_dict(), "input": None, "output": None, "jobs": jobs,
                   "exit_code": exit_code, "counts": counts,
                   "models": [entry for _, _, entry in results]}
        write_json(summary, json_path, files)
    if not quiet or exit_code:
        parts = [f"{n} {what.replace('_', ' ')}" for what, n in counts.items()
                 if what != "models" and n]
        click.echo(f"bnfold: {counts['models']} models: {', '.join(parts)}", err=True)
    return exit_code


def _in_workers(tasks: list, jobs: int):
    """fold_one over `tasks` in `jobs` processes started once each (spawned: no fork of a
    process that has loaded onnxruntime), task i going to worker i % jobs; results yielded in
    order as they come. Each worker has a pipe of its own: nothing is shared that a worker
    stopped by a signal could leave locked. On any exception (a signal) the workers are sent
    SIGTERM, which they unwind (removing their temporaries), and waited for."""
    context = multiprocessing.get_context("spawn")
    workers, pipes = [], []
    try:
        for i in range(jobs):
            receive, send = context.Pipe(duplex=False)
            worker = context.Process(target=_worker_main, args=(tasks[i::jobs], send),
                                     daemon=True)
            worker.start()
            send.close()
            workers.append(worker)
            pipes.append(receive)
        for i in range(len(tasks)):
            try:
                yield pipes[i % jobs].recv()
            except EOFError:
                raise BnfoldError(f"a worker process ended without folding {tasks[i][0]} "
                                  f"(exit code {workers[i % jobs].exitcode})") from None
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join()


def _worker_main(tasks: list, pipe) -> None:
    _worker_start()
    try:
        for task in tasks:
            pipe.send(fold_one(task))
        pipe.close()
    except BaseException:  # its temporaries were removed on the way here
        if _worker.get("stopping"):  # a signal, maybe wrapped (onnxruntime's ImportError)
            os._exit(128 + _worker["stopping"])
        raise


def fold_one(task) -> tuple[int, str, dict]:
    """Fold one model of a batch; (exit code, what it printed, its summary entry). Runs in
    this process or in a worker."""
    from bnfold.cli.fold import fold_file  # (fold imports this module)

    path, output, in_place, options, quiet = task
    text = io.StringIO()
    summary: list[dict] = []
    start = time.perf_counter()
    with contextlib.redirect_stderr(text), contextlib.redirect_stdout(text):
        if not quiet:
            click.echo(f"== {path}" + (f" -> {output}" if output and output != path else ""),
                       err=True)
        try:
            _worker["busy"] = True
            code = fold_file(path, output, in_place, options, None, quiet, summary)
        except Stopped as stop:
            if _worker.get("started"):  # temporaries removed on the way here
                os._exit(stop.exit_code)
            raise
        except (BnfoldError, OSError) as err:
            message = one_line(err)
            click.echo(f"bnfold: error: {message}", err=True)
            return 2, text.getvalue(), {
                "input": path, "output": output, "exit_code": 2, "error": message,
                "timings": {"total": round(time.perf_counter() - start, 6)}}
        finally:
            _worker["busy"] = False
    entry = summary[0] if summary else {"input": path, "output": output}
    return code, text.getvalue(), {**entry, "exit_code": code}


def _show(result: tuple[int, str, dict]) -> tuple[int, str, dict]:
    click.echo(result[1], err=True, nl=False)
    return result


_worker = {"busy": False}  # in a worker process: folding a model now


def _worker_start() -> None:
    """A worker leaves Ctrl-C to the main process, which stops the workers; SIGTERM (from it)
    unwinds the model a worker is folding, so that its temporary files are removed, then
    ends it quietly (the main process reports the signal)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker["started"] = True

    def stop(signum, frame):
        if not _worker["busy"]:
            os._exit(128 + signum)
        _worker["stopping"] = signum
        if not defer_if_held(signum):
            raise Stopped(signum)

    signal.signal(signal.SIGTERM, stop)
