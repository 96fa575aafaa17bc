"""Result objects returned by the passes, and their text and JSON renderings."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class Decision:
    """What happened to one batch-norm (a BatchNormalization node or an affine chain)."""

    node: str  # the BN node's name, or its output name when the node is unnamed
    action: str  # "folded", "kept" or "lowered"
    direction: str | None = None  # "backward" or "forward" when folded
    into: str | None = None  # name of the layer it was folded into
    reason: str | None = None  # why it was kept (or lowered)
    graph: str = "main"  # "main", or the path of a subgraph: "main/If_0:then_branch"
    op: str = "BatchNormalization"  # or "affine" for Sub/Mul/Add/Div chains
    nodes: list[str] = field(default_factory=list)  # the nodes it is made of (a chain's several)
    note: str | None = None  # a warning that does not stop the fold, e.g. "1 channel"

    def describe(self) -> str:
        where = "" if self.graph == "main" else f" [{self.graph}]"
        if self.action == "folded":
            text = f"folded   {self.node}{where} {self.direction} into {self.into}"
            return text + (f" (note: {self.note})" if self.note else "")
        note = f" (note: {self.note})" if self.note else ""
        if self.action == "lowered":
            return f"lowered  {self.node}{where} to Mul+Add ({self.reason}){note}"
        return f"kept     {self.node}{where}: {self.reason}{note}"


@dataclass
class OutputComparison:
    """Agreement of one graph output between the original (reference) and a candidate model.

    max_abs/max_rel/needed_* compare the two models directly. ``criterion`` says what decided:
    "exact" (integer, bool, string outputs), "close" (within ``bound`` = 8 ulps of the original),
    "accuracy" (``e_cand`` <= ``bound`` = K * (``e_orig`` + ``allowance``) + 8 ulps, errors
    against the float64 reference, for the worst draw and channel, ``worst``), "tolerance" (the
    given atol/rtol), "scaled tolerance" (no float64 reference: atol raised to what the
    original's own rounding needs, ``e_orig`` its estimate) or "shape" (the shapes differ).
    """

    name: str
    dtype: str
    shape: list[int]
    max_abs: float
    max_rel: float
    atol: float | None  # None when "close" or "accuracy" decided
    rtol: float | None
    passed: bool
    # The smallest atol (with rtol as given) and the smallest rtol (with atol as given) that pass.
    needed_atol: float
    needed_rtol: float
    note: str | None = None  # e.g. "shape mismatch", "NaN in candidate only"
    criterion: str = "tolerance"
    e_orig: float | None = None  # max |original - float64 reference| (worst draw)
    e_cand: float | None = None  # max |candidate - float64 reference|
    allowance: float | None = None  # output movement from 1 ulp of the rewritten weights
    bound: float | None = None  # what e_cand (accuracy) or max_abs (close) had to stay within
    worst: str | None = None  # where the accuracy figures are from: "draw 2, channel 3 (axis 1)"

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        text = f"{self.name} ({self.dtype} {self.shape}): max abs {self.max_abs:.3g}"
        if self.criterion == "accuracy":
            text += (f"; error vs float64: candidate {self.e_cand:.3g}, original "
                     f"{self.e_orig:.3g}, bound {self.bound:.3g}")
            if self.allowance:
                text += f" (rounding allowance {self.allowance:.3g})"
            if not self.passed and self.worst:
                text += f" at {self.worst}"
            text += f" {verdict}"
        elif self.criterion == "close":
            text += f" (within {self.bound:.3g}, 8 ulps) {verdict}"
        else:
            text += (f", max rel {self.max_rel:.3g} (atol {self.atol:g}, rtol {self.rtol:g})"
                     f" {verdict}")
            if self.criterion == "scaled tolerance":
                text += f" [no float64 reference; original's rounding ~{self.e_orig:.3g}]"
        return text + (f" - {self.note}" if self.note else "")


@dataclass
class RegionCheck:
    """One rewritten region, cut out of both models and compared on its own."""

    name: str  # "region 1", ...
    reference_nodes: list[str]  # the region's nodes in the reference, by name
    candidate_nodes: list[str]
    inputs: list[str]  # the values it reads (its constants are inside)
    outputs: list[OutputComparison] = field(default_factory=list)
    draws: str = ""  # the inputs it was compared on

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed,
                "reference_nodes": self.reference_nodes, "candidate_nodes": self.candidate_nodes,
                "inputs": self.inputs, "draws": self.draws,
                "outputs": [_comparison_dict(o) for o in self.outputs]}

    def describe(self) -> list[str]:
        verdict = "ok" if self.passed else "FAILED"
        head = (f"{self.name}: {', '.join(self.reference_nodes) or '-'} -> "
                f"{', '.join(self.candidate_nodes) or '-'} {verdict}")
        return [head] + ["  " + o.describe() for o in self.outputs]


@dataclass
class VerifyReport:
    """Outcome of running two models on the same inputs and comparing every output."""

    outputs: list[OutputComparison] = field(default_factory=list)
    inputs: str = ""  # where the inputs came from: "random (seed 0, batch=3)" or a file name
    runs: int = 0  # how many input sets were compared
    method: str = "whole model"  # or "regions: N" when each rewritten region was checked alone
    notes: list[str] = field(default_factory=list)  # draws skipped, why regions were checked
    regions: list[RegionCheck] = field(default_factory=list)
    error: str | None = None  # why the candidate failed outright: it cannot load or run
    reference: str | None = None  # which float64 reference ran (or why none)

    @property
    def passed(self) -> bool:
        return (self.error is None and all(o.passed for o in self.outputs)
                and all(r.passed for r in self.regions))

    @property
    def failures(self) -> list[OutputComparison]:
        return ([o for o in self.outputs if not o.passed]
                + [o for r in self.regions for o in r.outputs if not o.passed])

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "method": self.method, "inputs": self.inputs,
                "runs": self.runs, "error": self.error, "notes": list(self.notes),
                "reference": self.reference,
                "outputs": [_comparison_dict(o) for o in self.outputs],
                "regions": [r.to_dict() for r in self.regions]}

    def to_text(self) -> str:
        head = "verification passed" if self.passed else "verification FAILED"
        lines = [f"{head} ({self.method}) on {self.inputs}"]
        if self.error:
            lines.append(f"  {self.error}")
        if self.reference:
            lines.append(f"  reference: {self.reference}")
        lines += ["  " + o.describe() for o in self.outputs]
        for region in self.regions:
            lines += ["  " + line for line in region.describe()]
        lines += ["  note: " + note for note in self.notes]
        return "\n".join(lines)


def _comparison_dict(o: OutputComparison) -> dict[str, Any]:
    return {k: _json_number(v) for k, v in asdict(o).items()}


def _json_number(value):
    """Strict JSON has no inf or NaN: write those as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@dataclass
class ModelStats:
    nodes: int
    parameters: int  # elements in initializers (of a sparse one: its values) and Constant nodes
    ops: dict[str, int] = field(default_factory=dict)  # nodes by op type ("domain.op" if not ONNX's)
    size: int | None = None  # bytes of the model file and its data files, when it is a file

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RemovedNode:
    """A node other than a batch norm that the pass removed: a no-op Cast, a bias Add merged
    into its layer, a constant the folds left unread."""

    op: str
    name: str  # display name: the node's name, or its first output
    graph: str = "main"
    why: str = ""  # "no-op" (a Cast to its input's type), "merged into a layer" (a bias Add
    # the fold took into the layer's bias), "unused after folding" (a constant left unread)


@dataclass
class FoldReport:
    """Everything `fold` did, for people (``to_text``) and pipelines (``to_dict``)."""

    decisions: list[Decision] = field(default_factory=list)
    before: ModelStats | None = None
    after: ModelStats | None = None
    removed_casts: int = 0
    verification: VerifyReport | None = None
    notes: list[str] = field(default_factory=list)
    removed: list[RemovedNode] = field(default_factory=list)  # non-BN nodes removed, graph order
    # False when nothing was folded, lowered or switched to inference mode: the model is
    # returned exactly as it was
    changed: bool = False
    upgraded_from: int | None = None  # the input's opset, when it was converted to opset 7

    @property
    def folded(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "folded"]

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "kept"]

    @property
    def lowered(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "lowered"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "folded": len(self.folded),
            "kept": len(self.kept),
            "lowered": len(self.lowered),
            "removed_casts": self.removed_casts,
            "changed": self.changed,
            "upgraded_from": self.upgraded_from,
            "decisions": [asdict(d) for d in self.decisions],
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
            "verification": self.verification.to_dict() if self.verification else None,
            "notes": list(self.notes),
            "removed": [asdict(r) for r in self.removed],
            "why_unchanged": self.why_unchanged(),
        }

    def why_unchanged(self) -> str | None:
        """The one line saying why nothing was folded (the "nothing to fold: ..." note); None
        when something was."""
        return next((n for n in self.notes if n.startswith("nothing to fold: ")), None)

    def to_text(self) -> str:
        lines = [d.describe() for d in self.decisions]
        if self.removed:
            lines.append(f"removed {len(self.removed)} other nodes: {_grouped(self.removed)}")
        summary = f"{len(self.folded)} folded, {len(self.kept)} kept"
        if self.lowered:
            summary += f", {len(self.lowered)} lowered"
        if self.removed_casts:
            summary += f", {self.removed_casts} no-op Cast removed"
        lines.append(summary)
        if self.upgraded_from is not None:
            lines.append(f"opset {self.upgraded_from} converted to opset 7 (onnx's version "
                         f"converter) to fold")
        if self.before and self.after and self.changed:
            lines += _changes_table(self.before, self.after)
        lines += self.notes
        if self.verification is not None:
            lines.append(self.verification.to_text())
        return "\n".join(lines)


def _grouped(removed: list[RemovedNode]) -> str:
    """"3 Cast (no-op Cast), 2 Constant (unused after folding)": counted by op and why."""
    counts: dict[tuple[str, str], int] = {}
    for r in removed:
        counts[(r.op, r.why)] = counts.get((r.op, r.why), 0) + 1
    return ", ".join(f"{n} {op}" + (f" ({why})" if why else "")
                     for (op, why), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _changes_table(before: ModelStats, after: ModelStats) -> list[str]:
    """before -> after: nodes, those of each op type whose count changed (BN and Cast always,
    when present), parameters, file size (when both are files)."""
    ops = sorted(set(before.ops) | set(after.ops))
    shown = [op for op in ops if before.ops.get(op, 0) != after.ops.get(op, 0)
             or op in ("BatchNormalization", "Cast")]
    rows = [("nodes", str(before.nodes), str(after.nodes))]
    rows += [("  " + op, str(before.ops.get(op, 0)), str(after.ops.get(op, 0))) for op in shown]
    rows.append(("parameters", str(before.parameters), str(after.parameters)))
    if before.size is not None and after.size is not None:
        rows.append(("file size", _bytes(before.size), _bytes(after.size)))
    widths = [max(len(r[i]) for r in [("", "before", "after"), *rows]) for i in range(3)]
    return [f"  {a.ljust(widths[0])}  {b.rjust(widths[1])} -> {c.rjust(widths[2])}"
            for a, b, c in [("", "before", "after"), *rows]]


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def summary(values) -> dict[str, float]:
    """The smallest, average and largest of a statistics tensor (float64)."""
    array = np.asarray(values, dtype=np.float64)
    if not array.size:
        return {"min": 0.0, "mean": 0.0, "max": 0.0}
    return {"min": float(array.min()), "mean": float(array.mean()), "max": float(array.max())}


def _range(s: dict[str, float] | None) -> str:
    return "?" if not s else f"{s['min']:.4g}..{s['max']:.4g} (avg {s['mean']:.4g})"


@dataclass
class BnCalibration:
    """What `calibrate` did to one BatchNormalization."""

    node: str
    graph: str = "main"
    action: str = "calibrated"  # or "skipped"
    reason: str | None = None  # why skipped
    level: int | None = None  # calibrated BNs on the longest path before it
    pass_index: int | None = None  # the pass (1-based) that measured it
    samples: int = 0  # values per channel measured: samples x spatial positions
    old_mean: dict[str, float] | None = None  # min/mean/max over channels
    new_mean: dict[str, float] | None = None
    old_var: dict[str, float] | None = None
    new_var: dict[str, float] | None = None
    initializers: list[str] = field(default_factory=list)  # where the new statistics are
    copied: list[str] = field(default_factory=list)  # "old -> new" when not updated in place
    per_activation: bool = False  # opset < 9 spatial=0: statistics per activation
    note: str | None = None

    def describe(self) -> str:
        where = "" if self.graph == "main" else f" [{self.graph}]"
        if self.action != "calibrated":
            return f"skipped     {self.node}{where}: {self.reason}"
        text = (f"calibrated  {self.node} (level {self.level}, pass {self.pass_index}, "
                f"{self.samples} values per channel): mean {_range(self.old_mean)} -> "
                f"{_range(self.new_mean)}; var {_range(self.old_var)} -> {_range(self.new_var)}")
        if self.copied:
            text += f"; copied to new initializers ({', '.join(self.copied)})"
        return text + (f" ({self.note})" if self.note else "")


@dataclass
class CalibrateReport:
    """Everything `calibrate` did, for people (``to_text``) and pipelines (``to_dict``)."""

    method: str = "exact"
    data: str = ""  # where the samples came from
    samples: int = 0  # samples read in one pass
    batch_size: int = 0
    passes: int = 0  # passes over the data
    levels: int = 0
    bns: list[BnCalibration] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def calibrated(self) -> list[BnCalibration]:
        return [b for b in self.bns if b.action == "calibrated"]

    @property
    def skipped(self) -> list[BnCalibration]:
        return [b for b in self.bns if b.action != "calibrated"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "data": self.data, "samples": self.samples,
            "batch_size": self.batch_size, "passes": self.passes, "levels": self.levels,
            "calibrated": len(self.calibrated), "skipped": len(self.skipped),
            "bns": [{k: _json_number(v) if not isinstance(v, dict) else
                     {kk: _json_number(vv) for kk, vv in v.items()}
                     for k, v in asdict(b).items()} for b in self.bns],
            "notes": list(self.notes),
        }

    def to_text(self) -> str:
        lines = [b.describe() for b in self.bns]
        method = ("exact: one pass per level" if self.method == "exact"
                  else "batch: one pass, batch statistics averaged")
        lines.append(f"{len(self.calibrated)} calibrated, {len(self.skipped)} skipped; "
                     f"{self.samples} samples from {self.data} in batches of {self.batch_size}, "
                     f"{self.passes} pass{'es' if self.passes != 1 else ''} over the data "
                     f"({self.levels} level{'s' if self.levels != 1 else ''}; {method})")
        lines += self.notes
        return "\n".join(lines)
