"""Runs `bnfold fold` in forked children for tests/test_signals.py, and prints what happened as
JSON. Forking after one import makes a run cost a few tens of milliseconds, so a child can be
killed at every step of a write. The parent never runs onnxruntime (children may, after the
fork); the test process checks the results.

    python tests/commit_driver.py kill BASE        each case of commit_cases, killed (SIGKILL)
                                                   before the k-th file-system call, every k
    python tests/commit_driver.py signal BASE      SIGTERM / SIGINT during a slow step, and
                                                   SIGTERM arriving during the commit
    python tests/commit_driver.py race BASE N R    N runs writing one output at once, R times
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import bnfold.cli.fold  # noqa: E402
from bnfold.cli import main  # noqa: E402
from commit_cases import CASES, conv_bn, make, save_model, spill_above  # noqa: E402

# The file-system calls of a write: making the folder, each file reaching the disk, each
# rename, link and removal.
STEPS = ("mkdir", "fsync", "replace", "rename", "link", "unlink", "rmdir")


def fold(args: list[str]) -> None:
    """In a child: run `bnfold fold` and exit with its exit code."""
    code = 0
    try:
        main(["fold", *args, "-q"], standalone_mode=True)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    os._exit(code)


def before_step(k: int, act) -> None:
    """Call `act` just before the k-th file-system call of this process."""
    calls = [0]
    for name in STEPS:
        real = getattr(os, name)

        def step(*args, _real=real, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                act()
            return _real(*args, **kwargs)

        setattr(os, name, step)


def child(work) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(99)  # work() exits itself; this is for errors in the test's own code
    return pid


def outcome(status: int) -> dict:
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"code": os.WEXITSTATUS(status)}


def kill(base: str) -> dict:
    """Every case, killed before step 1, 2, ... until a run ends by itself."""
    results = {}
    for c, case in enumerate(CASES):
        runs = []
        for k in range(1, 100):
            directory = os.path.join(base, f"case{c}", f"k{k}")
            args = make(case, directory) + ["--no-verify"]  # the write is what is killed

            def work(k=k, args=args, limit=spill_above(case)):
                if limit is not None:
                    bnfold.cli.fold._SPILL_ABOVE = limit
                before_step(k, lambda: os.kill(os.getpid(), signal.SIGKILL))
                fold(args)

            _, status = os.waitpid(child(work), 0)
            runs.append({"dir": directory, "args": args, **outcome(status)})
            if "signal" not in runs[-1]:
                break
        results[case] = runs
    return results


def signals(base: str) -> list[dict]:
    results = []
    case = "over an output with external data"
    for number, (signum, when) in enumerate([(signal.SIGTERM, "verifying"),
                                             (signal.SIGINT, "verifying"),
                                             (signal.SIGTERM, "committing")]):
        directory = os.path.join(base, f"s{number}")
        args = make(case, directory)
        ready_r, ready_w = os.pipe()

        def work(signum=signum, when=when, args=args):
            os.close(ready_r)
            if when == "verifying":  # a slow step: the parent signals while it sleeps
                def slow_verify(*a, **k):
                    os.write(ready_w, b"x")
                    time.sleep(60)
                bnfold.cli.fold.verify = slow_verify
            else:  # the signal arrives as the commit's first rename starts
                real_replace = os.replace

                def replace(*a, **k):
                    os.replace = real_replace  # once
                    os.kill(os.getpid(), signum)
                    return real_replace(*a, **k)
                os.replace = replace
                os.write(ready_w, b"x")
            fold(args)

        pid = child(work)
        os.close(ready_w)
        os.read(ready_r, 1)
        os.close(ready_r)
        start = time.monotonic()
        if when == "verifying":
            os.kill(pid, signum)
        _, status = os.waitpid(pid, 0)
        results.append({"dir": directory, "signum": int(signum), "when": when,
                        "seconds": time.monotonic() - start, **outcome(status)})
    return results


def race(base: str, runs: int, rounds: int) -> list[dict]:
    """`runs` folds of different models to one output at once, over an older output."""
    results = []
    for r in range(rounds):
        directory = os.path.join(base, f"r{r}")
        os.makedirs(directory)
        for i in range(runs):
            save_model(conv_bn(i), os.path.join(directory, f"in{i}.onnx"), f"in{i}.onnx.data")
        save_model(conv_bn(9), os.path.join(directory, "out.onnx"), "out.onnx.data")
        go_r, go_w = os.pipe()
        pids = []
        for i in range(runs):
            args = [os.path.join(directory, f"in{i}.onnx"), "-o",
                    os.path.join(directory, "out.onnx")]

            def work(args=args):
                os.close(go_w)
                os.read(go_r, 1)  # all start at once
                fold(args)

            pids.append(child(work))
        os.close(go_r)
        os.close(go_w)  # go
        codes = [outcome(os.waitpid(pid, 0)[1]) for pid in pids]
        results.append({"dir": directory, "runs": codes})
    return results


if __name__ == "__main__":
    mode, base, *rest = sys.argv[1:]
    report = {"kill": kill, "signal": signals,
              "race": lambda b: race(b, *map(int, rest))}[mode](base)
    print(json.dumps(report))
