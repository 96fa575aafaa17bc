"""What a pass changed, at a glance: the model's census before and after (nodes by op type,
parameters), the nodes that went, and where each node stands in graph order.

Nodes are known by (graph path, op type, name): names are unique in a model and a rewrite keeps
the layers it changes (it may rename their outputs, so an unnamed node is known by its op and
first input or output instead). Reads no tensor data.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

import onnx

from bnfold.nodes import display_name, subgraphs
from bnfold.report import ModelStats, RemovedNode

def walk(graph: onnx.GraphProto, path: str = "main") -> Iterator[tuple[str, onnx.NodeProto]]:
    """(graph path, node) in graph order; a subgraph's nodes right after the node that owns it.
    Paths are those of the fold report: "main", "main/If_0:then_branch"."""
    for node in graph.node:
        yield path, node
        for attr_name, sub in subgraphs(node):
            yield from walk(sub, f"{path}/{display_name(node)}:{attr_name}")


def census(model: onnx.ModelProto) -> ModelStats:
    """Node counts (in all, and by op type) and parameter count, subgraphs included."""
    ops: Counter[str] = Counter()
    parameters = 0
    for graph in _graphs(model.graph):
        parameters += sum(math.prod(t.dims) for t in graph.initializer)
    for _, node in walk(model.graph):
        ops[_op(node)] += 1
        if node.op_type == "Constant":
            parameters += sum(math.prod(a.t.dims) for a in node.attribute if a.name == "value")
    return ModelStats(nodes=sum(ops.values()), parameters=parameters,
                      ops=dict(sorted(ops.items())))


def snapshot(model: onnx.ModelProto) -> list[tuple[str, onnx.NodeProto]]:
    """Every (graph path, node) in graph order, with the nodes copied: what `removed_nodes`
    and `graph_order` compare a pass's result with."""
    nodes = []
    for path, node in walk(model.graph):
        copy = onnx.NodeProto()
        copy.op_type, copy.domain, copy.name = node.op_type, node.domain, node.name
        copy.input.extend(node.input[:1])
        copy.output.extend(node.output[:1])
        nodes.append((path, copy))
    return nodes


def removed_nodes(before: list[tuple[str, onnx.NodeProto]], after: list[tuple[str, onnx.NodeProto]],
                  why: str, skip: set[tuple[str, str]] = frozenset()) -> list[RemovedNode]:
    """The nodes of snapshot `before` that snapshot `after` lacks, in graph order, but those in
    `skip` ((graph path, display name): the batch norms themselves, which the decisions report)."""
    now = {key for path, node in after for key in _keys(path, node)}
    return [RemovedNode(op=_op(node), name=display_name(node), graph=path, why=why)
            for path, node in before
            if not now.intersection(_keys(path, node))
            and (path, display_name(node)) not in skip]


def graph_order(before: list[tuple[str, onnx.NodeProto]]) -> dict[tuple[str, str], int]:
    """(graph path, display name) -> position, to sort reports in graph order."""
    order: dict[tuple[str, str], int] = {}
    for position, (path, node) in enumerate(before):
        order.setdefault((path, display_name(node)), position)
    return order


def _keys(path: str, node: onnx.NodeProto) -> list[tuple[str, str, str, str]]:
    """A named node is known by its name; an unnamed one by its first input or its first output
    (a rewrite may rename one of them, not both)."""
    op = _op(node)
    if node.name:
        return [(path, op, "name", node.name)]
    return [(path, op, "input", node.input[0] if node.input else ""),
            (path, op, "output", node.output[0] if node.output else "")]


def _op(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for _, sub in subgraphs(node):
            yield from _graphs(sub)
