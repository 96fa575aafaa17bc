"""Run two models in onnxruntime on the same inputs and compare every output.

Both sessions run with graph optimizations disabled: otherwise onnxruntime fuses Conv+BN in the
reference too, and the check would compare bnfold's folding with onnxruntime's.

Whether an output passes is criterion.py's: within 8 ulps of the reference model, or as
accurate as it against its float64 evaluation (reference.py); with atol/rtol given,
``|a - b| <= atol + rtol * |b|`` (compare.py). NaN against NaN and inf against inf of the same
sign agree. One session at a time: each model runs on every draw, then is freed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnx

from bnfold.errors import BadInput
from bnfold.report import VerifyReport
from bnfold.verify.criterion import Sources, judge
from bnfold.verify.perturb import rewritten, with_perturbed
from bnfold.verify.reference import float64_runs
from bnfold.verify.inputs import (check_same_interface, describe_random, dim_sizes, given_feeds,
                                  interface, random_feeds)
from bnfold.verify.runtime import run_session, session

Model = onnx.ModelProto | str | os.PathLike


def verify(
    reference: Model,
    candidate: Model,
    *,
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, int] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    runs: int = 1,
    base_dir: str | os.PathLike | None = None,
) -> VerifyReport:
    """Compare ``candidate`` with ``reference`` on the same inputs, output by output.

    ``inputs`` (an .npz path or a dict, cast to the declared types) replaces the random inputs,
    which are drawn ``runs`` times with seeds ``seed, seed + 1, ...``; ``dims`` sizes their
    symbolic dimensions. ``atol``/``rtol`` replace the default criterion by the tolerance test
    (the one not given: by dtype, see ``compare.TOLERANCES``) for every output. ``base_dir`` is where in-memory models keep their external data.
    A mismatch gives a report that did not pass; models with different interfaces, inputs that
    do not fit and onnxruntime errors raise BadInput.
    """
    if runs < 1:
        raise BadInput(f"runs must be at least 1, not {runs}")
    if (atol is not None and not atol >= 0) or (rtol is not None and not rtol >= 0):
        raise BadInput(f"tolerances must be non-negative (atol {atol}, rtol {rtol})")
    ref, cand = interface(reference), interface(candidate)
    check_same_interface(ref, cand)
    if inputs is None:
        sizes = dim_sizes(ref.inputs, dims, avoid=ref.dims | cand.dims)
        feed_sets = [random_feeds(ref.inputs, sizes, seed + i) for i in range(runs)]
        described = describe_random(seed, runs, sizes)
    else:
        feed_sets = [given_feeds(ref.inputs, inputs)]
        described = (
            "given inputs" if isinstance(inputs, Mapping) else f"inputs from {os.fspath(inputs)}"
        )
    names = [t.name for t in ref.outputs]
    original = _run_all(reference, base_dir, "reference", feed_sets, described)
    results = _run_all(candidate, base_dir, "candidate", feed_sets, described)
    outputs, reference_text = judge(
        names, original, results, _sources(reference, candidate, base_dir, feed_sets, seed),
        atol, rtol)
    return VerifyReport(outputs=outputs, inputs=described, runs=len(feed_sets),
                        reference=reference_text)


def _run_all(model: Model, base_dir, role: str, feed_sets, described: str) -> list[dict]:
    """``model``'s outputs on every draw; one session at a time, freed when done."""
    runner = session(model, base_dir, role)
    return [run_session(runner, feeds, f"the {role} on {described}") for feeds in feed_sets]


def _sources(reference: Model, candidate: Model, base_dir, feed_sets, seed: int) -> Sources:
    """The runs the criterion may need, built only when it asks."""
    def proto(model: Model) -> tuple[onnx.ModelProto, str | None]:
        if isinstance(model, onnx.ModelProto):
            return model, None if base_dir is None else os.fspath(base_dir)
        path = os.fspath(model)
        return onnx.load(path, load_external_data=False), os.path.dirname(os.path.abspath(path))

    def float64():
        model, folder = proto(reference)
        return float64_runs(model, folder, feed_sets)

    def perturbed_candidate():
        (original, original_dir), (model, folder) = proto(reference), proto(candidate)
        names = rewritten(original, original_dir or "", model, folder or "")
        if not names:
            return None
        moved = with_perturbed(model, names, folder or "", seed)
        return _run_all(moved, folder, "candidate with its new weights moved by one ulp",
                        feed_sets, "the same inputs")

    def perturbed_original():
        model, folder = proto(reference)
        moved = with_perturbed(model, None, folder or "", seed)
        return _run_all(moved, folder, "reference with its weights moved by one ulp",
                        feed_sets, "the same inputs")

    return Sources(float64, perturbed_candidate, perturbed_original)


def random_inputs(
    model: Model, *, dims: Mapping[str, int] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded random inputs for ``model`` as ``verify`` draws them; ``dims`` sizes symbolic dims."""
    iface = interface(model)
    return random_feeds(iface.inputs, dim_sizes(iface.inputs, dims, iface.dims), seed)


def run(
    model: Model, feeds: Mapping[str, np.ndarray], *, base_dir: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
    """Run ``model`` once in onnxruntime, graph optimizations disabled; outputs by name."""
    return run_session(session(model, base_dir, "model"), feeds, "the model")


__all__ = ["random_inputs", "run", "verify"]
