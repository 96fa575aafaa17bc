"""Small helpers on ONNX nodes and graphs: names, attributes, subgraphs. The ground floor: it
imports nothing of bnfold's."""

from __future__ import annotations

from typing import Iterator

import onnx


def display_name(node: onnx.NodeProto) -> str:
    """The name users know a node by: its name, else its first output."""
    return node.name or (node.output[0] if node.output else node.op_type)


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            node.attribute[i].CopyFrom(onnx.helper.make_attribute(name, value))
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


_GRAPH, _GRAPHS = onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS


def subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """(attribute name, graph) for each graph in the node's attributes, a GRAPHS attribute's
    as "name[i]". A list, empty for most nodes: whole-model walks call this once per node, and
    a generator costs more to make."""
    found = []
    for a in node.attribute:
        kind = a.type
        if kind == _GRAPH:
            found.append((a.name, a.g))
        elif kind == _GRAPHS:
            found += [(f"{a.name}[{i}]", g) for i, g in enumerate(a.graphs)]
    return found


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph in it, at any depth."""
    yield graph
    for node in graph.node:
        for _, sub in subgraphs(node):
            yield from graphs(sub)
