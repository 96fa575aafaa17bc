"""A read-mostly view of one ONNX graph: producers, consumers, constants, shapes, fresh names.

The passes rewrite the protobuf directly; a `GraphView` is rebuilt after each rewrite (it is cheap:
it indexes names, it never copies tensor data).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.constants import computed_constant
from bnfold.nodes import subgraphs

MIN_OPSET = 7  # fold converts older models (BN-6: is_test, consumed_inputs) to it first

# The float element types bnfold computes with, and their numpy types.
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.BFLOAT16: ml_dtypes.bfloat16,
}

# Largest initializer (in elements) copied into the model used for shape inference.
_SHAPE_DATA_LIMIT = 4096


def free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads from its enclosing scopes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for _, g in subgraphs(node):
            used |= free_names(g)
        defined.update(node.output)
    used.update(o.name for o in graph.output)
    return used - defined


def defined_names(graph: onnx.GraphProto) -> set[str]:
    """Names a graph defines itself (its inputs, initializers, node outputs): inside it, they
    shadow any outer value of the same name."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    defined.update(o for node in graph.node for o in node.output if o)
    return defined


def all_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor and node name in the model, subgraphs included."""
    names: set[str] = set()

    def visit(g: onnx.GraphProto) -> None:
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
        for node in g.node:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)
            for _, sub in subgraphs(node):
                visit(sub)

    visit(model.graph)
    names.discard("")
    return names


class NameAllocator:
    """Hands out names unused anywhere in the model, derived from readable bases."""

    def __init__(self, model: onnx.ModelProto):
        self.taken = all_names(model)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def infer_shapes(model: onnx.ModelProto) -> tuple[dict[str, tuple], dict[str, int]]:
    """Shape and element type of every value onnx can infer.

    Shapes map names to tuples of int | str | None; types map names to TensorProto element types.

    Runs on a skeleton of the model (large initializers without their data), so it costs no
    memory for the weights and works for models over 2 GB. Shapes come from the graph inputs,
    the initializers and the operators only: the model's `value_info` and the shapes declared
    for its outputs are dropped first, since tools leave annotations there that no longer hold.
    """
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g = skeleton.graph
    for field_name in ("node", "input", "output"):
        getattr(g, field_name).extend(getattr(model.graph, field_name))
    for output in g.output:
        output.type.tensor_type.ClearField("shape")
    for node in g.node:
        for _, sub in subgraphs(node):
            _drop_value_info(sub)
    g.name = model.graph.name
    for t in model.graph.initializer:
        light = g.initializer.add()
        light.name, light.data_type = t.name, t.data_type
        light.dims.extend(t.dims)
        if int(np.prod(t.dims)) <= _SHAPE_DATA_LIMIT and not is_external(t):
            light.CopyFrom(t)
    listed = {i.name for i in g.input}
    for t in model.graph.initializer:  # give every initializer a type for inference
        if t.name not in listed:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:  # inference is a hint: without it, rank-dependent rules refuse
        inferred = skeleton
    shapes: dict[str, tuple] = {}
    types: dict[str, int] = {}

    def visit(graph: onnx.GraphProto) -> None:
        for v in list(graph.input) + list(graph.output) + list(graph.value_info):
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                types[v.name] = v.type.tensor_type.elem_type
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
                dims = []
                for d in v.type.tensor_type.shape.dim:
                    if d.HasField("dim_value"):
                        dims.append(d.dim_value)
                    else:
                        dims.append(d.dim_param or None)
                shapes[v.name] = tuple(dims)
        for t in graph.initializer:
            shapes[t.name], types[t.name] = tuple(t.dims), t.data_type
        for node in graph.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        shapes[node.output[0]] = tuple(a.t.dims)
                        types[node.output[0]] = a.t.data_type
            for _, sub in subgraphs(node):
                visit(sub)

    visit(inferred.graph)
    return shapes, types


def _drop_value_info(graph: onnx.GraphProto) -> None:
    del graph.value_info[:]
    for node in graph.node:
        for _, sub in subgraphs(node):
            _drop_value_info(sub)


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def tensor_value(tensor: onnx.TensorProto, base_dir: str) -> np.ndarray:
    """A tensor's value, its data read from external files when it has any. onnx refuses
    absolute locations; bnfold writes them itself for weights it spilled to disk."""
    info = {e.key: e.value for e in tensor.external_data}
    if not is_external(tensor) or not os.path.isabs(info.get("location", "")):
        return numpy_helper.to_array(tensor, base_dir)
    header = onnx.TensorProto()
    header.CopyFrom(tensor)
    del header.external_data[:]
    header.data_location = onnx.TensorProto.DEFAULT
    with open(info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        header.raw_data = f.read(int(info["length"]))
    return numpy_helper.to_array(header)


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node, or None for forms we do not read (sparse)."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


@dataclass
class Scope:
    """What one graph defines, for lookups from it and from its subgraphs."""

    graph: onnx.GraphProto
    outer: Scope | None
    overridable: set[str] = field(default_factory=set)  # initializers a caller may override
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    constant_nodes: dict[str, onnx.NodeProto] = field(default_factory=dict)
    # every name the graph defines (inputs, node outputs, initializers): a lookup from an inner
    # graph stops here, since such a name shadows any outer one
    defined: set[str] = field(default_factory=set)

    def lookup(self, name: str) -> tuple[Scope, str] | None:
        """The scope whose definition of `name` a reader in this scope sees, and its kind
        ("initializer", "constant" or "computed"); None when no scope defines it."""
        scope = self
        while scope is not None:
            if name in scope.initializers:
                return scope, "initializer"
            if name in scope.constant_nodes:
                return scope, "constant"
            if name in scope.defined:
                return scope, "computed"
            scope = scope.outer
        return None


class GraphView:
    """Index of one graph, with access to constants of the enclosing scopes."""

    def __init__(self, model: onnx.ModelProto, graph: onnx.GraphProto, *, outer: Scope | None,
                 base_dir: str | None, allow_initializer_inputs: bool,
                 shapes: dict[str, tuple], types: dict[str, int], names: NameAllocator):
        self.graph, self.names = graph, names
        self.base_dir = base_dir or ""
        self.shapes, self.types = shapes, types
        self.is_main = outer is None
        self.opset = default_opset(model)
        self.legacy_inputs = model.ir_version < 4 and self.is_main
        self.scope = Scope(graph, outer)
        self.scope.initializers = {t.name: t for t in graph.initializer}
        input_names = {i.name for i in graph.input}
        self.scope.defined = input_names | set(self.scope.initializers)
        if not self.legacy_inputs and not allow_initializer_inputs:
            self.scope.overridable = input_names & set(self.scope.initializers)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                self.scope.constant_nodes[node.output[0]] = node
            for o in node.output:
                if o:
                    self.producer[o] = node
                    self.scope.defined.add(o)
            used = [n for n in node.input if n]
            for _, sub in subgraphs(node):
                used += sorted(free_names(sub))
            for name in dict.fromkeys(used):
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}

    # -- structure ------------------------------------------------------------------------

    def users(self, name: str) -> list[onnx.NodeProto]:
        return self.consumers.get(name, [])

    def sole_user(self, name: str) -> onnx.NodeProto | None:
        users = self.users(name)
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def why_not_private(self, name: str, owner: str) -> str | None:
        """Reason `name` cannot be rewired: it has other consumers or is a graph output."""
        if name in self.outputs:
            return f"output of {owner} is a graph output"
        if len(self.users(name)) > 1:
            return f"output of {owner} has other consumers"
        return None

    def shape(self, name: str) -> tuple | None:
        return self.shapes.get(name)

    def elem_type(self, name: str) -> int | None:
        return self.types.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    # -- constants ------------------------------------------------------------------------

    def constant(self, name: str) -> np.ndarray | str:
        """The value of a constant tensor, or the reason it is not one."""
        node = self.producer.get(name)
        if node is not None and node.op_type == "Identity":  # TorchScript shares equal tensors so
            return self.constant(node.input[0])
        if node is not None and node.op_type != "Constant":  # computed from constants only?
            value = computed_constant(self, name)
            return value if value is not None else f"'{name}' is not constant"
        found = self.scope.lookup(name)
        if found is None or found[1] == "computed":  # a graph input, or a node's output
            return f"'{name}' is not constant"
        scope, kind = found
        if kind == "initializer":
            if name in scope.overridable:
                return (f"initializer '{name}' is also a graph input (a caller may override "
                        f"it; allow with --allow-initializer-inputs)")
            return tensor_value(scope.initializers[name], self.base_dir)
        value = constant_node_value(scope.constant_nodes[name])
        return value if value is not None else f"'{name}' is a sparse constant"

    def constant_dtype(self, name: str) -> int | None:
        node = self.producer.get(name)
        if node is not None and node.op_type == "Identity":
            return self.constant_dtype(node.input[0])
        found = self.scope.lookup(name)
        if found is not None and found[1] == "initializer":
            return found[0].initializers[name].data_type
        if found is not None and found[1] == "constant":
            for a in found[0].constant_nodes[name].attribute:
                if a.name == "value":
                    return a.t.data_type
            return onnx.TensorProto.FLOAT
        return self.types.get(name)


def rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every reader of `old` (subgraphs included) read `new`."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for _, sub in subgraphs(node):
            if old in defined_names(sub):  # the body's own `old` shadows ours
                continue
            rename_uses(sub, old, new)
            for output in sub.output:  # a body may return an outer value directly
                if output.name == old:
                    output.name = new


def remove_where(container, predicate) -> None:
    """Delete the items of a repeated protobuf field that match, in place: rebuilding the field
    would copy every tensor of a large model."""
    for index in reversed([i for i, item in enumerate(container) if predicate(item)]):
        del container[index]
