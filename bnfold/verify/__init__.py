"""Run two models in onnxruntime on the same inputs and compare every output.

Both sessions run with graph optimizations disabled: otherwise onnxruntime fuses Conv+BN in the
reference too, and the check would compare bnfold's folding with onnxruntime's.

The whole model is run on several draws of random inputs (`inputs.py`). A draw the reference
cannot run is skipped; one the reference runs and the candidate cannot fails the check. When no
draw runs at all, each rewritten region is cut out of both models and checked alone
(`regions.py`); a region that cannot be run either means the check cannot be done: BadInput.

Whether an output passes is criterion.py's: within 8 ulps of the reference model, or as
accurate as it against its float64 evaluation (reference.py); with atol/rtol given,
``|a - b| <= atol + rtol * |b|`` (compare.py). NaN against NaN and inf against inf of the same
sign agree. One session at a time: each model runs on every draw, then is freed; the float64
reference and the one-ulp runs come after, only when the criterion asks for them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnx

from bnfold.errors import BadInput
from bnfold.report import OutputComparison, VerifyReport
from bnfold.verify.compare import compare
from bnfold.verify.criterion import Sources, Unavailable, judge, tolerance_for
from bnfold.verify.perturb import rewritten, with_perturbed
from bnfold.verify.reference import float64_runs
from bnfold.verify.inputs import (CannotDraw, Draw, InputMaker, Value, check_same_interface,
                                  given_feeds, interface, read_model)
from bnfold.verify.regions import check_regions
from bnfold.verify.usage import input_uses
from bnfold.verify.runtime import RunFailed, load_session, run_session, session

Model = onnx.ModelProto | str | os.PathLike


def verify(
    reference: Model,
    candidate: Model,
    *,
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, int] | None = None,
    atol: float | Mapping[str, float] | None = None,
    rtol: float | Mapping[str, float] | None = None,
    seed: int = 0,
    runs: int = 2,
    base_dir: str | os.PathLike | None = None,
    verbose: bool = False,
) -> VerifyReport:
    """Compare ``candidate`` with ``reference`` on the same inputs, output by output.

    ``inputs`` (an .npz path or a dict, cast to the declared types) replaces the random inputs,
    which are drawn ``runs`` times with seeds ``seed, seed + 1, ...`` (draw 1: symbolic dims
    fresh primes, floats standard normal; draw 2: dims 1, floats in 0..255; then again);
    ``dims`` sizes their symbolic dimensions. ``atol``/``rtol`` replace the defaults (by dtype,
    see ``compare.TOLERANCES``): the tolerance test replaces the default criterion, for every
    output when a number, for the outputs named when a mapping (name -> value, "*" for the
    others; outputs it does not name take the default criterion). ``base_dir`` is where in-memory models keep
    their external data. ``verbose`` lets onnxruntime's own log lines through to stderr.

    A mismatch, or a candidate that fails where the reference runs, gives a report that did not
    pass. Models with different interfaces, inputs that do not fit, a reference onnxruntime
    cannot load and a check that cannot be done raise BadInput.
    """
    if runs < 1:
        raise BadInput(f"runs must be at least 1, not {runs}")
    for tolerance in (atol, rtol):
        values = tolerance.values() if isinstance(tolerance, Mapping) else [tolerance]
        if any(v is not None and not v >= 0 for v in values):
            raise BadInput(f"tolerances must be non-negative (atol {atol}, rtol {rtol})")
    result = check_runs(reference, candidate, ref_dir=base_dir, cand_dir=base_dir,
                        inputs=inputs, dims=dims, atol=atol, rtol=rtol, seed=seed, runs=runs,
                        verbose=verbose)
    if isinstance(result, VerifyReport):
        return result
    return check_regions(reference, candidate, base_dir=base_dir, dims=dims, atol=atol,
                         rtol=rtol, seed=seed, runs=runs, verbose=verbose, notes=result)


def check_runs(reference: Model, candidate: Model, *, ref_dir, cand_dir, inputs, dims, atol,
               rtol, seed: int, runs: int, verbose: bool,
               role: str = "reference") -> VerifyReport | list[str]:
    """Run both models on the draws and compare them: a report, or (when the reference runs on
    no draw) the notes saying why."""
    # A model given by path is read once here, and not held while the other is read or while
    # sessions run: one model in memory at a time.
    ref_model = read_model(reference)
    ref = interface(ref_model)
    uses = input_uses(ref_model, ref.inputs) if inputs is None else None
    del ref_model
    cand = interface(candidate)
    check_same_interface(ref, cand)
    if inputs is None:
        maker = InputMaker(ref, dims, ref.dims | cand.dims, seed, uses)
    else:
        given = (
            "given inputs" if isinstance(inputs, Mapping) else f"inputs from {os.fspath(inputs)}"
        )
        feeds = given_feeds(ref.inputs, inputs)
    # One session at a time: the reference on the draws (skipping those it cannot run), then
    # the candidate on the draws the reference ran.
    ref_session = session(reference, ref_dir, role, verbose=verbose)
    draws, original, notes = [], [], []
    # A skipped draw is made up for with the next ones, up to twice as many as asked.
    for index in range(1 if inputs is not None else 2 * runs):
        if len(draws) == runs:
            break
        if inputs is not None:
            draw = Draw(feeds, given)
        else:
            try:
                draw = maker.draw(index)
            except CannotDraw as err:
                notes.append(f"no random inputs: {err}")
                break
        try:
            original.append(run_session(ref_session, draw.feeds))
        except RunFailed as err:
            if inputs is not None:
                raise BadInput(f"onnxruntime failed to run the reference on {given}: "
                               f"{err}") from None
            notes.append(f"skipped a draw the reference cannot run ({draw.description}): {err}")
            continue
        draws.append(draw)
    del ref_session
    if not draws:
        return notes
    described = given if inputs is not None else (
        f"random inputs ({'; '.join(d.description for d in draws)})")
    try:
        cand_session = load_session(candidate, cand_dir, verbose=verbose)
    except RunFailed as err:
        return VerifyReport(inputs=described, notes=notes, error=(
            f"onnxruntime cannot load the candidate (it loads the reference): {err}"))
    results = []
    for draw in draws:
        try:
            results.append(run_session(cand_session, draw.feeds))
        except RunFailed as err:
            return VerifyReport(
                inputs=draw.description, notes=notes, runs=len(results) + 1,
                error=f"the candidate fails on inputs the reference runs on: {err}")
    del cand_session
    sources = _sources(reference, candidate, ref_dir, cand_dir, [d.feeds for d in draws],
                       verbose)
    outputs, reference_text = compare_outputs(ref.outputs, list(zip(original, results)),
                                              atol, rtol, sources)
    return VerifyReport(outputs=outputs, inputs=described, runs=len(draws), notes=notes,
                        reference=reference_text)


def compare_outputs(outputs: list[Value], results: list[tuple[dict, dict]],
                    atol: float | None, rtol: float | None,
                    sources: Sources | None = None) -> tuple[list[OutputComparison], str]:
    """One comparison per tensor output, over all draws (criterion.py), and which reference
    ran; a sequence output is compared element by element ("name[i]"), an optional one where
    both hold a value. Without ``sources``, no float64 reference (the scaled tolerances)."""
    comparisons, keys, mismatches = [], [], {}
    flat = [({}, {}) for _ in results]
    for out in outputs:
        for (r, c), (fr, fc) in zip(results, flat):
            for key, a, b, why in _flatten(out.name, r[out.name], c[out.name]):
                if why:
                    mismatches.setdefault(out.name, (key, out.type, why))
                else:
                    if key not in keys:
                        keys.append(key)
                    fr[key], fc[key] = a, b
    # A key (a sequence element) missing from some draw is compared on the draws it is in.
    complete = [k for k in keys if all(k in fr for fr, _ in flat)]
    partial = [k for k in keys if k not in complete]
    judged, described = judge(complete, [fr for fr, _ in flat], [fc for _, fc in flat],
                              sources or _no_sources(), atol, rtol)
    by_key = {o.name: o for o in judged}
    for k in partial:
        by_key[k] = compare(k, [(fr[k], fc[k]) for fr, fc in flat if k in fr],
                            tolerance_for(atol, k), tolerance_for(rtol, k))
    for out in outputs:
        if out.name in mismatches:
            comparisons.append(_mismatch(*mismatches[out.name]))
        comparisons += [by_key[k] for k in keys if k == out.name or k.startswith(out.name + "[")]
    return comparisons, described


def _sources(reference: Model, candidate: Model, ref_dir, cand_dir, feed_sets,
             verbose: bool) -> Sources:
    """The runs the criterion may ask for, each built only then, one session at a time."""
    def proto(model: Model, base_dir) -> tuple[onnx.ModelProto, str]:
        if isinstance(model, onnx.ModelProto):
            return model, "" if base_dir is None else os.fspath(base_dir)
        return read_model(model), os.path.dirname(os.path.abspath(os.fspath(model)))

    def runs(model: onnx.ModelProto, folder: str) -> list[dict]:
        try:
            runner = load_session(model, folder or None, verbose=verbose)
            return [_flat_outputs(run_session(runner, feeds)) for feeds in feed_sets]
        except RunFailed as err:
            raise Unavailable(str(err)) from None

    def float64():
        # A model given by path is read by float64_runs, which holds the only reference to it
        # and frees it once widened.
        outputs, described = float64_runs(reference, ref_dir, feed_sets, verbose)
        return [_flat_outputs(o) for o in outputs], described

    def perturbed_candidate():
        (original, original_dir), (model, folder) = (proto(reference, ref_dir),
                                                     proto(candidate, cand_dir))
        names = rewritten(original, original_dir, model, folder)
        if not names:
            return None
        try:
            return runs(with_perturbed(model, names, folder, 0), folder)
        except Unavailable:
            return None  # no allowance: the test without it decides

    def perturbed_original():
        model, folder = proto(reference, ref_dir)
        return runs(with_perturbed(model, None, folder, 0), folder)

    return Sources(float64, perturbed_candidate, perturbed_original)


def _no_sources() -> Sources:
    def none():
        raise Unavailable("not asked for")
    return Sources(none, lambda: None, none)


def _flat_outputs(outputs: dict) -> dict:
    """Outputs by name, sequences and maps element by element as ``compare_outputs`` keys them."""
    flat = {}
    for name, value in outputs.items():
        for key, a, _, why in _flatten(name, value, value):
            if not why:
                flat[key] = a
    return flat


def _flatten(name: str, a, b):
    """(key, reference array, candidate array, mismatch) for every tensor in two outputs."""
    if a is None or b is None:
        if (a is None) != (b is None):
            yield name, None, None, f"empty in the {'reference' if a is None else 'candidate'} only"
        return
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))) or len(a) != len(b):
            yield name, None, None, (f"sequence of {_length(a)} in the reference, "
                                     f"{_length(b)} in the candidate")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _flatten(f"{name}[{i}]", x, y)
        return
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or a.keys() != b.keys():
            yield name, None, None, "maps with different keys"
            return
        for key in sorted(a):
            yield from _flatten(f"{name}[{key!r}]", a[key], b[key])
        return
    yield name, np.asarray(a), np.asarray(b), None


def _length(x) -> str:
    return str(len(x)) if isinstance(x, (list, tuple)) else "no sequence"


def _mismatch(name: str, type_text: str, note: str) -> OutputComparison:
    inf = float("inf")
    return OutputComparison(name=name, dtype=type_text, shape=[], max_abs=inf, max_rel=inf,
                            atol=0.0, rtol=0.0, passed=False, needed_atol=inf, needed_rtol=inf,
                            note=note)


def random_inputs(
    model: Model, *, dims: Mapping[str, int] | None = None, seed: int = 0, draw: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs for ``model`` as ``verify(seed=seed)`` makes them in its draw number ``draw``
    (0, 1, ...); ``dims`` sizes symbolic dims."""
    model = read_model(model)
    iface = interface(model)
    try:
        uses = input_uses(model, iface.inputs)
        return InputMaker(iface, dims, iface.dims, seed, uses).draw(draw).feeds
    except CannotDraw as err:
        raise BadInput(f"cannot draw inputs: {err}") from None


def run(
    model: Model, feeds: Mapping[str, np.ndarray], *, base_dir: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
    """Run ``model`` once in onnxruntime, graph optimizations disabled; outputs by name."""
    try:
        return run_session(session(model, base_dir, "model"), feeds)
    except RunFailed as err:
        raise BadInput(f"onnxruntime failed to run the model: {err}") from None


__all__ = ["random_inputs", "run", "verify"]
