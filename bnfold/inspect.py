"""What `bnfold inspect` shows: the Dense layers of a model, and whether each batch norm folds.

The layers come from `bnfold.dense`; the batch-norm verdicts are those of a trial `fold` (which
works on a copy), so inspect and fold can never disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import os
from typing import Any

import onnx

from bnfold.dense import DENSE_OPS, Layer, find_layers
from bnfold.fold import fold
from bnfold.io import model_argument
from bnfold.nodes import display_name
from bnfold.report import Decision


@dataclass
class InspectReport:
    """The layers `insert` can select, and what `fold` would do with each batch norm."""

    layers: list[Layer] = field(default_factory=list)
    batchnorms: list[Decision] = field(default_factory=list)  # fold's verdict on every batch norm

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [{"position": i, **layer.to_dict()}
                       for i, layer in enumerate(self.layers, 1)],
            "batchnorms": [{**asdict(d), "foldable": d.action == "folded"}
                           for d in self.batchnorms],
        }

    def to_text(self) -> str:
        lines = [f"layers: {len(self.layers)}"]
        lines += _table(["#", "layer", "op", "in", "out", "activation", "batch norm"],
                        [[f"#{i}", layer.name, layer.op, _count(layer.in_features),
                          _count(layer.out_features), layer.activation_op or "-",
                          _around(layer)] for i, layer in enumerate(self.layers, 1)])
        lines.append(f"batch norms: {len(self.batchnorms)}")
        lines += _table(["batch norm", "op", "foldable", "how / why not"],
                        [[_where(d), d.op, "yes" if d.action == "folded" else "no", _how(d)]
                         for d in self.batchnorms])
        return "\n".join(lines)


def inspect(model: onnx.ModelProto | str | os.PathLike, *, ops=(), base_dir: str | None = None) -> InspectReport:
    """The layers of `model` whose op is in `ops` (default: Gemm and MatMul), and fold's
    decision for each of its batch norms; `model` (a ModelProto or a path, loaded by
    `bnfold.load`) is not modified."""
    model, base_dir, _ = model_argument(model, base_dir)
    layers = find_layers(model, tuple(ops) or DENSE_OPS)
    _, fold_report = fold(model, base_dir=base_dir)  # folds a copy; only the report is kept
    _place_chains(model, layers, fold_report.decisions)
    return InspectReport(layers=layers, batchnorms=fold_report.decisions)


_PASS_THROUGH = ("Cast", "Transpose")  # between a layer and a chain, as Keras exports them


def _place_chains(model: onnx.ModelProto, layers: list[Layer], decisions: list[Decision]) -> None:
    """Name the decomposed batch norms (Sub/Mul/Add chains, as Keras writes them) in the layer
    table too: after the layer whose output (or activation) they read, before the layer that
    reads theirs, Casts, layout Transposes and bias Adds in between skipped."""
    producer = {o: n for n in model.graph.node for o in n.output}
    by_name = {display_name(n): n for n in model.graph.node}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}

    def upstream(value: str) -> set[str]:
        seen = {value}
        while value in producer:
            node = producer[value]
            varying = [i for i in node.input if i not in constants]
            if not (node.op_type in _PASS_THROUGH or  # or a bias Add after a layout Transpose
                    (node.op_type == "Add" and len(varying) == 1 and len(node.input) == 2)):
                break
            value = varying[0] if node.op_type == "Add" else node.input[0]
            seen.add(value)
        return seen

    def downstream(value: str) -> set[str]:
        seen = {value}
        users = readers.get(value, [])
        while len(users) == 1 and users[0].op_type in _PASS_THROUGH:
            value = users[0].output[0]
            seen.add(value)
            users = readers.get(value, [])
        return seen

    for d in decisions:
        chain = [by_name.get(n) for n in d.nodes]
        if d.op != "affine" or d.graph != "main" or not chain or None in chain:
            continue
        x = next((i for i in chain[0].input if i not in constants), chain[0].input[0])
        before, after = upstream(x), downstream(chain[-1].output[0])
        for layer in layers:
            outputs = {layer.output} | ({layer.activation.output[0]} if layer.activation else set())
            if layer.batchnorm is None and outputs & before:
                layer.batchnorm = d.node
            if layer.batchnorm_before is None and layer.node.input[0] in after:
                layer.batchnorm_before = d.node


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in [header, *rows]]


def _count(n: int | None) -> str:
    return "?" if n is None else str(n)


def _around(layer: Layer) -> str:
    found = [f"after: {layer.batchnorm}"] if layer.batchnorm else []
    found += [f"before: {layer.batchnorm_before}"] if layer.batchnorm_before else []
    return ", ".join(found) or "-"


def _where(d: Decision) -> str:
    return d.node if d.graph == "main" else f"{d.node} [{d.graph}]"


def _how(d: Decision) -> str:
    if d.action == "folded":
        return f"{d.direction} into {d.into}"
    return d.reason or ""
