"""A read-mostly view of one ONNX graph: producers, consumers, constants, shapes, fresh names.

The passes rewrite the protobuf directly; a `GraphView` is rebuilt after each rewrite (it is cheap:
it indexes names, it never copies tensor data).
"""

from __future__ import annotations

import math
import os
import sys
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
        names.update(t.values.name for t in g.sparse_initializer)
        names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
        for node in g.node:
            names.add(node.name)
            names.update(node.input, node.output)
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
    return _inferred(_skeleton(model))


class Inference:
    """`infer_shapes` of a model as it is now, run on the first read of `shapes` or `types`.

    The skeleton is taken at construction, so a pass that rewrites the model afterwards reads
    what inference gives for the model it started from, as if inference had run first; names
    a rewrite gives to an existing value (`alias`) are added when it runs. Folds into Conv and
    Gemm read no shape, and so never run it.
    """

    def __init__(self, model: onnx.ModelProto):
        self._skeleton: onnx.ModelProto | None = _skeleton(model)
        self._shapes: dict[str, tuple] = {}
        self._types: dict[str, int] = {}
        self._aliases: list[tuple[str, str]] = []

    @classmethod
    def of(cls, shapes: dict[str, tuple], types: dict[str, int]) -> Inference:
        """An inference already made."""
        done = cls.__new__(cls)
        done._skeleton, done._shapes, done._types, done._aliases = None, shapes, types, []
        return done

    def _run(self) -> None:
        self._shapes, self._types = _inferred(self._skeleton)
        self._skeleton = None
        for old, new in self._aliases:
            self._alias(old, new)
        self._aliases = []

    @property
    def shapes(self) -> dict[str, tuple]:
        if self._skeleton is not None:
            self._run()
        return self._shapes

    @property
    def types(self) -> dict[str, int]:
        if self._skeleton is not None:
            self._run()
        return self._types

    def alias(self, old: str, new: str) -> None:
        """`new` names the value `old` names: the same shape and type (unless `new` has its
        own)."""
        if self._skeleton is not None:
            self._aliases.append((old, new))
        else:
            self._alias(old, new)

    def _alias(self, old: str, new: str) -> None:
        for known in (self._shapes, self._types):
            if old in known:
                known.setdefault(new, known[old])


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """What `_inferred` reads of the model: nodes, inputs, outputs (their shapes cleared),
    initializers (large ones without data); no value_info."""
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
    initializers = model.graph.initializer
    if all(math.prod(t.dims) <= _SHAPE_DATA_LIMIT and not is_external(t) for t in initializers):
        g.initializer.extend(initializers)  # small weights only: one copy, in C
    else:
        for t in initializers:
            light = g.initializer.add()
            if math.prod(t.dims) <= _SHAPE_DATA_LIMIT and not is_external(t):
                light.CopyFrom(t)
            else:
                light.name, light.data_type = t.name, t.data_type
                light.dims.extend(t.dims)
    if model.ir_version < 4:  # IR >= 4: onnx types initializers that are not inputs itself
        listed = {i.name for i in g.input}
        for t in model.graph.initializer:  # give every initializer a type for inference
            if t.name not in listed:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type,
                                                                  list(t.dims)))
    return skeleton


def _inferred(skeleton: onnx.ModelProto) -> tuple[dict[str, tuple], dict[str, int]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:  # inference is a hint: without it, rank-dependent rules refuse
        inferred = skeleton
    shapes, types = _Deferred(_shape_of), {}

    def visit(graph: onnx.GraphProto) -> None:
        for v in (*graph.input, *graph.output, *graph.value_info):
            if not v.type.HasField("tensor_type"):
                continue
            tensor_type = v.type.tensor_type
            if tensor_type.elem_type:
                types[v.name] = tensor_type.elem_type
            if tensor_type.HasField("shape"):
                shapes.defer(v.name, v)
        for t in graph.initializer:
            shapes.defer(t.name, t)
            types[t.name] = t.data_type
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


def _shape_of(source: onnx.ValueInfoProto | onnx.TensorProto) -> tuple:
    if isinstance(source, onnx.TensorProto):
        return tuple(source.dims)
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in source.type.tensor_type.shape.dim)


class _Deferred(dict):
    """A dict some of whose values are made from a source on first read: inference gives a
    shape to every value, and a pass reads a few."""

    def __init__(self, make):
        super().__init__()
        self._sources: dict = {}
        self._make = make

    def defer(self, key, source) -> None:
        dict.pop(self, key, None)
        self._sources[key] = source

    def _made(self, key) -> bool:
        source = self._sources.pop(key, None)
        if source is None:
            return dict.__contains__(self, key)
        dict.__setitem__(self, key, self._make(source))
        return True

    def __setitem__(self, key, value) -> None:
        self._sources.pop(key, None)
        dict.__setitem__(self, key, value)

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or key in self._sources

    def __getitem__(self, key):
        self._made(key)
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        return dict.__getitem__(self, key) if self._made(key) else default

    def setdefault(self, key, default=None):
        return dict.__getitem__(self, key) if self._made(key) else dict.setdefault(self, key, default)

    def __eq__(self, other) -> bool:
        for key in list(self._sources):
            self._made(key)
        return dict.__eq__(self, other)

    def __ne__(self, other) -> bool:
        return not self == other

    __hash__ = None


def _drop_value_info(graph: onnx.GraphProto) -> None:
    del graph.value_info[:]
    for node in graph.node:
        for _, sub in subgraphs(node):
            _drop_value_info(sub)


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


# Element types whose raw bytes are their numpy array as they are (on little-endian machines).
_RAW_TYPES = {t: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)) for t in (
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
    onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
    onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL)} if sys.byteorder == "little" else {}


def tensor_value(tensor: onnx.TensorProto, base_dir: str) -> np.ndarray:
    """A tensor's value, its data read from external files when it has any. onnx refuses
    absolute locations; bnfold writes them itself for weights it spilled to disk."""
    dtype = _RAW_TYPES.get(tensor.data_type)
    if dtype is not None and tensor.HasField("raw_data") and not is_external(tensor) \
            and not tensor.HasField("segment"):  # numpy_helper.to_array's result, sooner
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
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
    """Index of one graph, with access to constants of the enclosing scopes.

    Built once per graph and kept up to date by the rewrites, which change the graph through
    it (`set_input`, `set_output`, `remove`, `insert_after`, `add_initializer`). The index is a
    snapshot: changes show in it, and in the graph's node list, at the next `refresh`, which
    makes it what a fresh `GraphView` of the graph would be, at the cost of the changes only.
    """

    def __init__(self, model: onnx.ModelProto, graph: onnx.GraphProto, *, outer: Scope | None,
                 base_dir: str | None, allow_initializer_inputs: bool,
                 shapes: dict[str, tuple] | None = None, types: dict[str, int] | None = None,
                 inference: Inference | None = None, names: NameAllocator):
        """Shapes and types come from `inference`, or are the dicts `shapes` and `types`."""
        self.graph, self.names = graph, names
        self.base_dir = base_dir or ""
        self.inference = inference if inference is not None else Inference.of(shapes, types)
        self.is_main = outer is None
        self.opset = default_opset(model)
        self.legacy_inputs = model.ir_version < 4 and self.is_main
        self.scope = Scope(graph, outer)
        self.scope.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.scope.defined = self.inputs | set(self.scope.initializers)
        # sparse initializers: bnfold reads none as a constant, but they shadow outer names
        self.scope.defined.update(t.values.name for t in graph.sparse_initializer)
        if not self.legacy_inputs and not allow_initializer_inputs:
            self.scope.overridable = self.inputs & set(self.scope.initializers)
        self.producer: dict[str, onnx.NodeProto] = {}
        self._readers: dict[str, dict[int, onnx.NodeProto]] = {}  # name -> id -> node
        # id -> (node, names it reads, its outputs, its inputs), as indexed
        self._indexed: dict[int, tuple[onnx.NodeProto, tuple[str, ...], tuple[str, ...],
                                       tuple[str, ...]]] = {}
        # changes waiting for `refresh`
        self._changed: dict[int, onnx.NodeProto] = {}
        self._removed: dict[int, onnx.NodeProto] = {}
        self._inserted: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (node, after)
        self._new_initializers: list[onnx.TensorProto] = []
        for node in graph.node:
            self._index(node)
        self.outputs = {o.name for o in graph.output}

    def _index(self, node: onnx.NodeProto) -> None:
        inputs, outputs = tuple(node.input), tuple(node.output)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            self.scope.constant_nodes[outputs[0]] = node
        producer, defined, all_readers = self.producer, self.scope.defined, self._readers
        for o in outputs:
            if o:
                producer[o] = node
                defined.add(o)
        used = [n for n in inputs if n]
        for _, sub in subgraphs(node):
            used += sorted(free_names(sub))
        reads = tuple(dict.fromkeys(used))
        key = id(node)
        for name in reads:
            readers = all_readers.get(name)
            if readers is None:
                all_readers[name] = {key: node}
            else:
                readers[key] = node
        self._indexed[key] = (node, reads, outputs, inputs)

    def _unindex(self, node: onnx.NodeProto) -> None:
        key = id(node)
        _, reads, outputs, _ = self._indexed.pop(key)
        for name in reads:
            readers = self._readers[name]
            del readers[key]
            if not readers:
                del self._readers[name]
        for o in outputs:
            if o and self.producer.get(o) is node:
                del self.producer[o]
                if o not in self.inputs and o not in self.scope.initializers:
                    self.scope.defined.discard(o)
        if outputs and self.scope.constant_nodes.get(outputs[0]) is node:
            del self.scope.constant_nodes[outputs[0]]

    @property
    def shapes(self) -> dict[str, tuple]:
        return self.inference.shapes

    @property
    def types(self) -> dict[str, int]:
        return self.inference.types

    # -- structure ------------------------------------------------------------------------

    def users(self, name: str) -> list[onnx.NodeProto]:
        readers = self._readers.get(name)
        return list(readers.values()) if readers else []

    def ends(self, node: onnx.NodeProto) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The node's inputs and outputs as they are now: from the index, unless a change since
        the last refresh touched them (reading them from the protobuf costs more)."""
        key = id(node)
        indexed = self._indexed.get(key)
        if indexed is None or key in self._changed:
            return tuple(node.input), tuple(node.output)
        return indexed[3], indexed[2]

    def sole_user(self, name: str) -> onnx.NodeProto | None:
        readers = self._readers.get(name)
        if readers is None or len(readers) != 1 or name in self.outputs:
            return None
        return next(iter(readers.values()))

    def why_not_private(self, name: str, owner: str) -> str | None:
        """Reason `name` cannot be rewired: it has other consumers or is a graph output."""
        if name in self.outputs:
            return f"output of {owner} is a graph output"
        if len(self._readers.get(name, ())) > 1:
            return f"output of {owner} has other consumers"
        return None

    def is_graph_input(self, name: str) -> bool:
        return name in self.inputs

    def shape(self, name: str) -> tuple | None:
        return self.shapes.get(name)

    def elem_type(self, name: str) -> int | None:
        return self.types.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    # -- changes --------------------------------------------------------------------------

    def set_input(self, node: onnx.NodeProto, index: int, name: str) -> None:
        """node.input[index] = name (padding absent inputs with "")."""
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name
        self._changed[id(node)] = node

    def set_output(self, node: onnx.NodeProto, index: int, name: str) -> None:
        node.output[index] = name
        self._changed[id(node)] = node

    def remove(self, node: onnx.NodeProto) -> None:
        """Take `node` out of the graph (at the next `refresh`)."""
        self._removed[id(node)] = node

    def insert_after(self, after: onnx.NodeProto, node: onnx.NodeProto) -> onnx.NodeProto:
        """Put a copy of `node` right after `after` (after the nodes inserted after it before);
        returns the copy, which is the graph's."""
        added = self.graph.node.add()
        added.CopyFrom(node)
        self._inserted.append((added, after))
        return added

    def add_initializer(self, name: str) -> onnx.TensorProto:
        """A new, empty initializer of the graph named `name`."""
        tensor = self.graph.initializer.add()
        tensor.name = name
        self._new_initializers.append(tensor)
        return tensor

    def add_graph_input(self, value: onnx.ValueInfoProto) -> None:
        self.graph.input.append(value)
        self.inputs.add(value.name)
        self.scope.defined.add(value.name)

    def refresh(self) -> None:
        """Apply the changes since the last refresh to the node list and to the index."""
        if self._removed or self._inserted:
            self._sweep()
        for key, node in self._removed.items():
            self._changed.pop(key, None)
            if key in self._indexed:
                self._unindex(node)
        for node, _ in self._inserted:
            self._changed.pop(id(node), None)
            if id(node) not in self._removed:
                self._index(node)
        for key, node in self._changed.items():
            self._unindex(node)
            self._index(node)
        for tensor in self._new_initializers:
            self.scope.initializers[tensor.name] = tensor
            self.scope.defined.add(tensor.name)
        self._changed, self._removed, self._inserted, self._new_initializers = {}, {}, [], []

    def _sweep(self) -> None:
        """Remove and insert the nodes in one reordering of the node list: removing one node of
        a repeated protobuf field at a time costs as much as the field each time."""
        nodes = list(self.graph.node)  # (keeps every wrapper, and so every id, alive)
        step = len(self._inserted) + 1  # position * step (+ order, for inserted nodes)
        keys = dict(zip(map(id, nodes), range(0, len(nodes) * step, step)))
        for order, (node, after) in enumerate(self._inserted, 1):
            keys[id(node)] = keys[id(after)] - keys[id(after)] % step + order
        gone = len(nodes) * step
        for key in self._removed:
            keys[key] += gone
        self.graph.node.sort(key=lambda n: keys[id(n)])
        del self.graph.node[len(nodes) - len(self._removed):]

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
    rename_all(graph, {old: new})


def rename_all(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Make every reader of each old name (subgraphs included) read its new name, in one walk
    of the graph. A subgraph that defines an old name itself reads its own value: its readers
    are not renamed."""
    if not renames:
        return
    for node in graph.node:
        if not renames.keys().isdisjoint(node.input):
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
        for _, sub in subgraphs(node):
            shadowed = defined_names(sub)
            inner = {old: new for old, new in renames.items() if old not in shadowed}
            rename_all(sub, inner)
            for output in sub.output:  # a body may return an outer value directly
                if output.name in inner:
                    output.name = inner[output.name]


def remove_where(container, predicate) -> int:
    """Delete the items of a repeated protobuf field that match, in place (rebuilding the field
    would copy every tensor of a large model); returns how many."""
    items = list(container)  # (keeps every wrapper, and so every id, alive)
    doomed = [i for i, item in enumerate(items) if predicate(item)]
    if len(doomed) <= 16:  # deleting one item moves the ones after it
        for index in reversed(doomed):
            del container[index]
    elif doomed:  # a stable sort moves the doomed to the end, keeping the others' order
        flags = dict.fromkeys(map(id, items), False)
        flags.update((id(items[i]), True) for i in doomed)
        container.sort(key=lambda item: flags[id(item)])
        del container[len(items) - len(doomed):]
    return len(doomed)
