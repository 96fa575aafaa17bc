"""The tolerance test of one output: |a - b| <= atol + rtol * |b| in float64, NaN and inf
agreeing. It decides when the user gives atol/rtol, for exact (integer) outputs, and when no
float64 reference exists (criterion.py); it also gives every report its direct figures."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from bnfold.report import OutputComparison

# Default (atol, rtol) by output dtype: onnxruntime's op-test tolerances. atol is multiplied by the
# reference output's largest magnitude (at least 1): folding reorders rounding, and the rounding
# error of a deep model's output grows with the size of its values. Other dtypes compare exactly.
TOLERANCES = {
    np.dtype(np.float16): (2.5e-3, 1e-3),
    np.dtype(ml_dtypes.bfloat16): (2e-2, 1e-2),
    np.dtype(np.float32): (1e-5, 1e-4),
    np.dtype(np.float64): (1e-10, 1e-8),
}


def compare(
    name: str, pairs: list[tuple[np.ndarray, np.ndarray]], atol: float | None, rtol: float | None
) -> OutputComparison:
    """Compare one output over all runs; ``pairs`` holds (reference, candidate) arrays.

    max_rel leaves out positions where the reference is 0; needed_atol is the smallest atol that
    passes with this rtol, needed_rtol the smallest rtol with this atol (inf if none does).
    """
    ref = pairs[0][0]
    default_atol, default_rtol = TOLERANCES.get(ref.dtype, (0.0, 0.0))
    rtol = default_rtol if rtol is None else rtol
    result = dict(name=name, dtype=str(ref.dtype), shape=list(ref.shape), rtol=float(rtol))
    for r, c in pairs:
        if r.shape != c.shape:
            inf = float("inf")
            return OutputComparison(
                **result, atol=float(default_atol if atol is None else atol), passed=False,
                max_abs=inf, max_rel=inf, needed_atol=inf, needed_rtol=inf,
                note=f"shape mismatch: reference {list(r.shape)}, candidate {list(c.shape)}",
            )
    err, mag, note = _differences(
        np.concatenate([c.ravel() for _, c in pairs]), np.concatenate([r.ravel() for r, _ in pairs])
    )
    if atol is None:
        atol = default_atol * max(1.0, float(mag.max(initial=0.0)))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = err[mag > 0] / mag[mag > 0]
        excess = err - atol
        needed_rtol = np.where(excess > 0, excess / mag, 0.0)  # inf where |b| = 0 < excess
    return OutputComparison(
        **result,
        atol=float(atol),
        passed=bool(np.all(err <= atol + rtol * mag)),
        max_abs=float(err.max(initial=0.0)),
        max_rel=float(rel.max(initial=0.0)),
        needed_atol=float(np.maximum(err - rtol * mag, 0.0).max(initial=0.0)),
        needed_rtol=float(needed_rtol.max(initial=0.0)),
        note=note,
    )


def _differences(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, str | None]:
    """|a - b| in float64 per element, |b| (0 where not finite), and a note on NaN/inf mismatches.

    The error is 0 where both agree (NaN and NaN, inf and inf of the same sign) and inf where
    they cannot (NaN or inf on one side only), so no tolerance passes it.
    """
    if a.dtype.kind in "OSU" or b.dtype.kind in "OSU":  # strings: equal or not
        return np.where(a == b, 0.0, np.inf), np.zeros(b.shape), None
    a, b = a.astype(np.float64), b.astype(np.float64)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    agree = (a == b) | (nan_a & nan_b)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(agree, 0.0, np.abs(a - b))
    err[np.isnan(err)] = np.inf
    notes = []
    for count, text in (
        (np.count_nonzero(nan_a & ~nan_b), "NaN in candidate only"),
        (np.count_nonzero(nan_b & ~nan_a), "NaN in reference only"),
        (np.count_nonzero(~agree & (np.isinf(a) | np.isinf(b)) & ~nan_a & ~nan_b), "inf mismatch"),
    ):
        if count:
            notes.append(f"{text} at {count} position{'s' if count > 1 else ''}")
    mag = np.where(np.isfinite(b), np.abs(b), 0.0)
    return err, mag, "; ".join(notes) or None
