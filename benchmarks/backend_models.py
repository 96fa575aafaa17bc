"""bnfold over onnx's backend conformance models: fold (API) + the default check on each.

    python benchmarks/backend_models.py                  # every model (about 10 minutes)
    python benchmarks/backend_models.py --sample 4       # one in four
    python benchmarks/backend_models.py --limit 50 -v    # the first 50, one line each
    python benchmarks/backend_models.py --filter gather  # names containing "gather"

The models: every node test of onnx.backend.test.case.node.collect_testcases() and the model
folders shipped with onnx (backend/test/data/pytorch-operator, pytorch-converted, simple). A
model counts only when onnxruntime loads it and runs it on the test's own inputs. For each,
`bnfold.fold` then `bnfold.verify(original, folded)` with its defaults (random draws, region
checks), on every model, also those where nothing changed (the CLI writes those unchanged
without a check; running it here tests the check on every kind of model). Counted:

- error:    fold or verify raised (BadInput: the check cannot be done, or a crash) or timed out
- refused:  the check failed (exit 1 in the CLI)
- changed:  the folded model's outputs on the test's inputs differ from the expected outputs
            where the original's agree (the test's own rtol/atol)

Targets (issue 7): 0 errors, 0 changed, at most 1 % refused. Run it under a memory cap: each
case is checked in this process, so `ulimit -v` bounds all of them (the script also sets
RLIMIT_AS to --memory-gb). Exit code 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import glob
import json
import resource
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bnfold  # noqa: E402
from bnfold.errors import BadInput  # noqa: E402
from bnfold.verify.runtime import RunFailed, load_session, run_session  # noqa: E402

DATA_DIRS = ("pytorch-operator", "pytorch-converted", "simple")


class _Timeout(Exception):
    pass


def cases(name_filter: str | None):
    """(name, model, [(inputs by position, expected outputs)], rtol, atol) for every model."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        node_cases = collect_testcases()
    for case in node_cases:
        if case.model is None or (name_filter and name_filter not in case.name):
            continue
        yield case.name, case.model, list(case.data_sets or []), case.rtol, case.atol
    root = Path(onnx.__file__).parent / "backend" / "test" / "data"
    for kind in DATA_DIRS:
        for model_dir in sorted((root / kind).iterdir()):
            name = f"{kind}/{model_dir.name}"
            if name_filter and name_filter not in name:
                continue
            model = onnx.load(model_dir / "model.onnx")
            data_sets = []
            for data_dir in sorted(model_dir.glob("test_data_set_*")):
                data_sets.append(tuple(
                    [_read_pb(p) for p in sorted(glob.glob(str(data_dir / f"{what}_*.pb")),
                                                   key=_number)]
                    for what in ("input", "output")))
            yield name, model, data_sets, 1e-3, 1e-7


def _number(path: str) -> int:
    return int(Path(path).stem.split("_")[-1])


def _read_pb(path: str):
    tensor = onnx.TensorProto()
    tensor.ParseFromString(Path(path).read_bytes())
    return numpy_helper.to_array(tensor)


def _feeds(model: onnx.ModelProto, inputs: list) -> dict:
    initialized = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initialized]
    return dict(zip(names, inputs))


def _agree(got: dict, expected: list, model: onnx.ModelProto, rtol: float, atol: float) -> bool:
    for out, want in zip(model.graph.output, expected):
        if not _close(got[out.name], want, rtol, atol):
            return False
    return True


def _close(a, b, rtol, atol) -> bool:
    if isinstance(b, (list, tuple)) or isinstance(a, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))
                and len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b)))
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, dict) or isinstance(b, dict):
        return a == b
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "OSU" or b.dtype.kind in "OSU" or a.dtype.kind == "b":
        return bool(np.array_equal(a, b))
    a, b = a.astype(np.float64), b.astype(np.float64)
    return bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))


def check_one(name, model, data_sets, rtol, atol, timeout: int) -> tuple[str, str]:
    """(outcome, detail): "skipped" (onnxruntime cannot run it), "ok", "error", "refused",
    "changed"."""
    if not data_sets:
        return "skipped", "no test data"
    try:
        original = load_session(model, None)
        ran = [run_session(original, _feeds(model, inputs)) for inputs, _ in data_sets]
    except (RunFailed, BadInput) as err:
        return "skipped", f"onnxruntime: {str(err)[:150]}"
    del original
    signal.alarm(timeout)
    try:
        folded, report = bnfold.fold(model)
        check = bnfold.verify(model, folded)
        if not check.passed:
            return "refused", check.to_text().replace("\n", " | ")[:400]
        session = load_session(folded, None)
        for (inputs, expected), got in zip(data_sets, ran):
            if _agree(got, expected, model, rtol, atol):
                after = run_session(session, _feeds(model, inputs))
                if not _agree(after, expected, model, rtol, atol):
                    return "changed", f"folded: {report.to_text()[:200]}"
        detail = check.method + ("; " + "; ".join(check.notes) if check.notes else "")
        return "ok", detail[:300]
    except _Timeout:
        return "error", f"timed out after {timeout} s"
    except BadInput as err:
        return "error", f"BadInput: {err}"[:400]
    except MemoryError:
        return "error", "MemoryError"
    except Exception as err:  # a crash: the traceback's last lines
        tb = traceback.format_exc().strip().splitlines()
        return "error", f"{type(err).__name__}: {err} | " + " | ".join(tb[-4:])[:500]
    finally:
        signal.alarm(0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sample", type=int, default=1, help="check one case in N")
    parser.add_argument("--limit", type=int, help="stop after N cases onnxruntime runs")
    parser.add_argument("--filter", help="only cases whose name contains this")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per case")
    parser.add_argument("--memory-gb", type=float, default=6.0, help="address-space cap")
    parser.add_argument("--json", help="write every case's outcome here")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per case")
    args = parser.parse_args(argv)
    cap = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    def on_alarm(signum, frame):
        raise _Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    outcomes: dict[str, list] = {}
    start = time.perf_counter()
    counted = 0
    for index, (name, model, data_sets, rtol, atol) in enumerate(cases(args.filter)):
        if index % args.sample:
            continue
        if args.limit is not None and counted >= args.limit:
            break
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        case_start = time.perf_counter()
        outcome, detail = check_one(name, model, data_sets, rtol, atol, args.timeout)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        counted += outcome != "skipped"
        outcomes.setdefault(outcome, []).append((name, detail))
        if args.verbose or outcome in ("error", "refused", "changed"):
            grew = f" (peak +{(peak - before) // 1024} MB)" if peak - before > 100 * 1024 else ""
            print(f"{outcome:8} {name} [{time.perf_counter() - case_start:.1f} s]{grew}: {detail}",
                  flush=True)
    elapsed = time.perf_counter() - start
    runs = sum(len(v) for k, v in outcomes.items() if k != "skipped")
    counts = {k: len(outcomes.get(k, [])) for k in ("ok", "error", "refused", "changed", "skipped")}
    refused_share = counts["refused"] / runs if runs else 0.0
    print(f"\n{runs} models onnxruntime runs ({counts['skipped']} it cannot, skipped): "
          f"{counts['ok']} ok, {counts['error']} errors, {counts['changed']} changed, "
          f"{counts['refused']} refused ({100 * refused_share:.2f} %); {elapsed:.0f} s, peak "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")
    regions = sum(1 for _, d in outcomes.get("ok", []) if d.startswith("regions"))
    print(f"checked whole: {counts['ok'] - regions}, by regions: {regions}")
    if args.json:
        Path(args.json).write_text(json.dumps(outcomes, indent=1))
    return int(counts["error"] > 0 or counts["changed"] > 0 or refused_share > 0.01)


if __name__ == "__main__":
    sys.exit(main())
