"""What a pass changed, at a glance: the model's census before and after (nodes by op type,
parameters), the nodes that went, and where each node stands in graph order.

Nodes are known by (graph path, op type, name): names are unique in a model and a rewrite keeps
the layers it changes (it may rename their outputs, so an unnamed node is known by its op and
first input or output instead). A snapshot records that much of each node, in graph order, in
one walk of the model; the census and the comparisons read snapshots, not the model. Reads no
tensor data.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple

import onnx

from bnfold.nodes import display_name
from bnfold.report import ModelStats, RemovedNode

_GRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


class Seen(NamedTuple):
    """One node of a snapshot."""

    path: str  # the graph it is in, as the fold report names it: "main", "main/If_0:then_branch"
    op: str  # op type, prefixed by its domain outside the default one
    name: str
    first_input: str
    first_output: str
    parameters: int  # a Constant's value's element count; 0 for other nodes

    @property
    def display_name(self) -> str:
        return self.name or self.first_output or self.op.rpartition(".")[2]  # as nodes.py's


def snapshot(model: onnx.ModelProto) -> list[Seen]:
    """Every node of the model (subgraphs included, a subgraph's nodes right after the node that
    owns it) in graph order: what `census`, `removed_nodes` and `graph_order` read."""
    seen: list[Seen] = []
    _record(model.graph, "main", seen)
    return seen


def _record(graph: onnx.GraphProto, path: str, seen: list[Seen]) -> None:
    append = seen.append
    for node in graph.node:
        domain, op_type = node.domain, node.op_type
        op = op_type if domain in ("", "ai.onnx") else f"{domain}.{op_type}"
        inputs, outputs = node.input, node.output
        parameters = 0
        if op_type == "Constant":
            parameters = sum(math.prod(a.t.dims) for a in node.attribute if a.name == "value")
        append(Seen(path, op, node.name, inputs[0] if inputs else "",
                    outputs[0] if outputs else "", parameters))
        if node.attribute:
            for a in node.attribute:
                if a.type in _GRAPH_ATTRIBUTES:
                    _record_subgraphs(node, path, seen)
                    break


def _record_subgraphs(node: onnx.NodeProto, path: str, seen: list[Seen]) -> None:
    owner = f"{path}/{display_name(node)}"
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            _record(a.g, f"{owner}:{a.name}", seen)
        elif a.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                _record(g, f"{owner}:{a.name}[{i}]", seen)


def census(model: onnx.ModelProto, seen: list[Seen]) -> ModelStats:
    """Node counts (in all, and by op type) and parameter count, subgraphs included, of `model`
    as snapshot `seen` of it shows it."""
    ops = Counter(s.op for s in seen)
    parameters = sum(s.parameters for s in seen)
    parameters += sum(math.prod(t.dims) for t in model.graph.initializer)
    for graph in _subgraphs(model.graph):
        parameters += sum(math.prod(t.dims) for t in graph.initializer)
    return ModelStats(nodes=len(seen), parameters=parameters, ops=dict(sorted(ops.items())))


def removed_nodes(before: list[Seen], after: list[Seen], why: str,
                  skip: set[tuple[str, str]] = frozenset()) -> list[RemovedNode]:
    """The nodes of snapshot `before` that snapshot `after` lacks, in graph order, but those in
    `skip` ((graph path, display name): the batch norms themselves, which the decisions report)."""
    now = {key for s in after for key in _keys(s)}
    return [RemovedNode(op=s.op, name=s.display_name, graph=s.path, why=why)
            for s in before
            if now.isdisjoint(_keys(s)) and (s.path, s.display_name) not in skip]


def graph_order(before: list[Seen]) -> dict[tuple[str, str], int]:
    """(graph path, display name) -> position, to sort reports in graph order."""
    order: dict[tuple[str, str], int] = {}
    for position, s in enumerate(before):
        order.setdefault((s.path, s.display_name), position)
    return order


def _keys(s: Seen) -> tuple[tuple[str, str, str, str], ...]:
    """A named node is known by its name; an unnamed one by its first input or its first output
    (a rewrite may rename one of them, not both)."""
    if s.name:
        return ((s.path, s.op, "name", s.name),)
    return ((s.path, s.op, "input", s.first_input), (s.path, s.op, "output", s.first_output))


def _subgraphs(graph: onnx.GraphProto):
    """Every subgraph in `graph`, at any depth."""
    for node in graph.node:
        if not node.attribute:
            continue
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield a.g
                yield from _subgraphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield g
                    yield from _subgraphs(g)
