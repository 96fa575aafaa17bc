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

from bnfold.nodes import display_name, graphs, subgraphs
from bnfold.report import ModelStats, RemovedNode

class Seen(NamedTuple):
    """One node of a snapshot."""

    path: str  # the graph it is in, as the fold report names it: "main", "main/If_0:then_branch"
    op: str  # op type, prefixed by its domain outside the default one
    name: str
    display_name: str  # nodes.display_name's
    first_input: str
    first_output: str
    parameters: int  # a Constant's value's element count; 0 for other nodes


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
        shown = display_name(node)
        append(Seen(path, op, node.name, shown, inputs[0] if inputs else "",
                    outputs[0] if outputs else "", parameters))
        if node.attribute:  # (most nodes have none: no subgraph to look for)
            for attr_name, sub in subgraphs(node):
                _record(sub, f"{path}/{shown}:{attr_name}", seen)


def census(model: onnx.ModelProto, seen: list[Seen]) -> ModelStats:
    """Node counts (in all, and by op type) and parameter count, subgraphs included, of `model`
    as snapshot `seen` of it shows it."""
    ops = Counter(s.op for s in seen)
    parameters = sum(s.parameters for s in seen)
    for g in graphs(model.graph):
        parameters += sum(math.prod(t.dims) for t in g.initializer)
        parameters += sum(math.prod(s.values.dims) for s in g.sparse_initializer)  # stored values
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

