"""The criterion of the check: is the candidate as accurate as the original?

Folding moves rounding: a correct fold of a deep float32 network differs from the original by
about as much as both differ from exact arithmetic, so no fixed tolerance tells a correct fold
from a wrong one. Instead, for each float output and each draw d of inputs:

    D      = max |cand - orig|
    S      = 8 ulps of the output's dtype at max |R|            (slack for the last roundings)
    close  : D <= S                                             (then no reference is needed)
    E_orig = max |orig - R|,  E_cand = max |cand - R|           (R: the original in float64)
    pass   : E_cand <= K * (E_orig + A) + S,  K = 4 (float32, float64), 8 (float16, bfloat16)

A, the allowance, is how far the candidate's output moves when the weights it rewrote are moved
by one ulp (random signs): the rounding of those weights to their dtype is an error the
original does not have, and a few networks amplify it. It is computed only when the test fails
without it. Integer, bool and string outputs must be equal.

When the user gives atol/rtol, ``|cand - orig| <= atol + rtol * |orig|`` (compare.py) decides.
When no float64 reference can be built or run (or the model is float64 already, so widening gains
nothing), the default tolerances decide, their atol raised to ``K * (N + A) + S``, N being how
far the original's output moves when all its float weights move by one ulp: the size of the
rounding error the original itself carries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from bnfold.report import OutputComparison
from bnfold.verify.compare import TOLERANCES, _differences, compare

Outputs = Sequence[dict[str, np.ndarray]]  # one dict of outputs by name per draw

SLACK_ULPS = 8
FACTOR = {np.dtype(np.float32): 4.0, np.dtype(np.float64): 4.0,
          np.dtype(np.float16): 8.0, np.dtype(ml_dtypes.bfloat16): 8.0}


class Unavailable(Exception):
    """The float64 reference cannot be built or run; the message says why."""


@dataclass
class Sources:
    """The extra runs the criterion may ask for, each evaluated at most once, on every draw.

    reference: the original in float64 (raises Unavailable); perturbed_candidate: the candidate
    with its rewritten weights moved by one ulp (None when it rewrote none); perturbed_original:
    the original with all its float weights moved by one ulp.
    """

    reference: Callable[[], tuple[Outputs, str]]  # and a description of what ran
    perturbed_candidate: Callable[[], Outputs | None]
    perturbed_original: Callable[[], Outputs]

    def __post_init__(self):
        self._cache: dict[str, object] = {}

    def get(self, what: str):
        if what not in self._cache:
            try:
                self._cache[what] = getattr(self, what)()
            except Unavailable as err:
                self._cache[what] = err
        value = self._cache[what]
        if isinstance(value, Unavailable):
            raise value
        return value


Tolerance = float | Mapping[str, float] | None


def tolerance_for(tolerance: Tolerance, name: str) -> float | None:
    """The tolerance of output ``name`` (a sequence element "out[2]" takes its output's): one
    for every output, or by output name with "*" for the others; None: the default test."""
    if tolerance is None or not isinstance(tolerance, Mapping):
        return tolerance
    for key in (name, name.split("[", 1)[0], "*"):
        if key in tolerance:
            return float(tolerance[key])
    return None


def judge(
    names: Sequence[str], original: Outputs, candidate: Outputs, sources: Sources,
    atol: Tolerance = None, rtol: Tolerance = None,
) -> tuple[list[OutputComparison], str]:
    """Compare every output over all draws; also say which reference ran. An output with a
    tolerance (``atol``/``rtol``: one for all, or by output name) takes the tolerance test."""
    results: dict[str, OutputComparison] = {}
    pending = []
    for n in names:
        pairs = [(o[n], c[n]) for o, c in zip(original, candidate)]
        a, r = tolerance_for(atol, n), tolerance_for(rtol, n)
        if a is not None or r is not None:
            results[n] = compare(n, pairs, a, r)
            continue
        dtype = pairs[0][0].dtype
        if dtype not in FACTOR or any(a.shape != b.shape for a, b in pairs):
            results[n] = _with(compare(n, pairs, 0.0 if dtype not in FACTOR else None,
                                       0.0 if dtype not in FACTOR else None),
                               "exact" if dtype not in FACTOR else "shape")
        elif all(_close(a, b) for a, b in pairs):
            results[n] = _outcome(n, pairs, "close", passed=True)
        else:
            pending.append(n)
    described = "not needed (every float output within 8 ulps of the original)"
    if len(results) == len(names) and all(
            tolerance_for(atol, n) is not None or tolerance_for(rtol, n) is not None
            for n in names):
        described = "none (tolerances given)"
    if pending:
        try:
            reference, described = sources.get("reference")
            for n in pending:
                results[n] = _accuracy(n, original, candidate, reference, sources)
        except Unavailable as why:
            described = f"unavailable ({why}): tolerances scaled to the original's own rounding"
            for n in pending:
                results[n] = _scaled(n, original, candidate, sources)
    return [results[n] for n in names], described


def _accuracy(name, original, candidate, reference, sources) -> OutputComparison:
    pairs = [(o[name], c[name]) for o, c in zip(original, candidate)]
    k = FACTOR[pairs[0][0].dtype]
    draws = []
    for (a, b), r in zip(pairs, reference):
        if name not in r:
            raise Unavailable(f"it has no output {name}")
        r = np.asarray(r[name], np.float64).reshape(a.shape)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        usable = np.isfinite(a64) & np.isfinite(b64)
        r = np.where(np.isfinite(r), r, a64)  # where float64 overflows, judge against orig
        a64, b64, r = (np.where(usable, v, 0.0) for v in (a64, b64, r))
        draws.append(np.stack([_group_max(a64 - r, usable), _group_max(b64 - r, usable),
                               np.zeros(_groups(a)), _group_slack(r, a.dtype)]))
    if not _holds(draws, k):
        moved = sources.get("perturbed_candidate")
        if moved is not None:
            for draw, (_, b), m in zip(draws, pairs, moved):
                m = np.asarray(m[name]).astype(np.float64)
                b64 = b.astype(np.float64)
                usable = np.isfinite(m) & np.isfinite(b64)
                draw[2] = _group_max(np.where(usable, m, 0.0) - np.where(usable, b64, 0.0),
                                     usable)
    return _outcome(name, pairs, "accuracy", draws=draws, k=k)


def _groups(a: np.ndarray) -> int:
    """1 + the number of channels judged on their own: axis 1 when each channel has at least
    16 values (fewer make a channel's maximum error a matter of chance), so that an error in a
    small channel is not lost in the maximum of a large one; the first group is the whole."""
    if a.ndim >= 2 and a.shape[1] >= 2 and a.size // a.shape[1] >= 16:
        return 1 + a.shape[1]
    return 1


def _group_max(diff: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """max |diff| over the usable positions: of the whole output, then of each channel."""
    d = np.where(usable, np.abs(np.where(usable, diff, 0.0)), 0.0)
    whole = [_max(d)]
    if _groups(d) == 1:
        return np.array(whole)
    per_channel = np.moveaxis(d, 1, 0).reshape(d.shape[1], -1).max(axis=1, initial=0.0)
    return np.array(whole + list(per_channel))


def _group_slack(values: np.ndarray, dtype) -> np.ndarray:
    top = _group_max(values, np.isfinite(values))
    return np.array([_slack(np.array([t]), dtype) for t in top])


def _scaled(name, original, candidate, sources) -> OutputComparison:
    """No reference: the default tolerances, their atol at least K * (N + A) + S."""
    pairs = [(o[name], c[name]) for o, c in zip(original, candidate)]
    dtype = pairs[0][0].dtype
    k = FACTOR[dtype]
    noise = [_movement(o[name], m[name]) for o, m in
             zip(original, sources.get("perturbed_original"))]
    moved = sources.get("perturbed_candidate")
    allowance = ([0.0] * len(pairs) if moved is None else
                 [_movement(c[name], m[name]) for c, m in zip(candidate, moved)])
    atol_default, rtol = TOLERANCES[dtype]
    passed, worst = True, None
    for (a, b), n, al in zip(pairs, noise, allowance):
        err, mag, _ = _differences(b, a)
        atol = max(atol_default * max(1.0, _max(mag)), k * (n + al) + _slack(a))
        excess = _max(err - rtol * mag) / atol if atol > 0 else float("inf")
        ok = bool(np.all(err <= atol + rtol * mag))
        passed &= ok
        if worst is None or excess > worst[0]:
            worst = (excess, atol, n, al)
    result = compare(name, pairs, worst[1], rtol)
    result.passed = passed and result.passed
    return _with(result, "scaled tolerance", e_orig=worst[2], allowance=worst[3])


def _holds(draws, k) -> bool:
    return all(bool(np.all(e_cand <= k * (e_orig + a) + s)) for e_orig, e_cand, a, s in draws)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Within 8 ulps of the original, as a whole and channel by channel."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    err = _differences(b, a)[0]
    if not np.all(np.isfinite(err)):
        return False
    return bool(np.all(_group_max(err, np.ones(err.shape, bool))
                       <= _group_slack(np.where(np.isfinite(a64), a64, 0.0), a.dtype)))


def _outcome(name, pairs, criterion, *, passed=None, draws=None, k=None) -> OutputComparison:
    """The report of one output: orig-vs-cand figures, and the criterion's for its worst draw
    (and channel, when a channel is the worst)."""
    result = compare(name, pairs, None, None)
    result.atol = result.rtol = None
    if criterion == "close":
        return _with(result, criterion, passed=passed,
                     bound=max(_slack(a) for a, _ in pairs))
    worst = (-1.0, 0, 0)
    for d, (e_orig, e_cand, a, s) in enumerate(draws):
        bounds = k * (e_orig + a) + s
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(bounds > 0, e_cand / bounds, np.where(e_cand > 0, np.inf, 0.0))
        g = int(np.argmax(ratios))
        if ratios[g] > worst[0]:
            worst = (float(ratios[g]), d, g)
    _, d, g = worst
    e_orig, e_cand, allowance, slack = (float(v[g]) for v in draws[d])
    result.worst = f"draw {d + 1}" + (f", channel {g - 1} (axis 1)" if g > 0 else "")
    return _with(result, criterion, passed=_holds(draws, k) and result.note is None,
                 e_orig=e_orig, e_cand=e_cand, allowance=allowance,
                 bound=k * (e_orig + allowance) + slack)


def _with(result: OutputComparison, criterion: str, **fields) -> OutputComparison:
    result.criterion = criterion
    for key, value in fields.items():
        setattr(result, key, value if key == "passed" else
                (None if value is None else float(value)))
    return result


def _movement(before: np.ndarray, after: np.ndarray) -> float:
    a, b = before.astype(np.float64), np.asarray(after).astype(np.float64)
    usable = np.isfinite(a) & np.isfinite(b)
    return _max(np.abs(a[usable] - b[usable]))


def _max(values: np.ndarray) -> float:
    return float(np.max(values, initial=0.0))


def _slack(values: np.ndarray, dtype: np.dtype | None = None) -> float:
    """SLACK_ULPS ulps of ``dtype`` (default: the values' own) at the largest finite |value|."""
    dtype = np.dtype(values.dtype if dtype is None else dtype)
    v = np.abs(values.astype(np.float64))
    top = _max(v[np.isfinite(v)])
    info = ml_dtypes.finfo(dtype)
    exponent = max(np.floor(np.log2(top)) if top > 0 else info.minexp, info.minexp)
    return SLACK_ULPS * float(2.0 ** (exponent - info.nmant))
