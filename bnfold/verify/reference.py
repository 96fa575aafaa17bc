"""The reference of the check: the original model evaluated in float64.

Every float16, bfloat16 and float32 tensor of a copy of the model is widened to float64:
initializers and Constant values are cast (exactly), Cast/EyeLike/Random* target types and
ConstantOfShape values are widened, graph inputs are fed as float64 and outputs stay float64.
onnxruntime's CPU provider has no float64 kernel for some operators (its kernel registry says
which); those are rewritten with operators that have one (Conv as Pad + strided Slices + one
MatMul, GlobalAveragePool as ReduceMean, HardSigmoid and HardSwish as Mul/Add/Clip), or, when
no rewrite applies, run in their own type between two Casts (an "island": the reference is then
only as precise as the original at that operator, and the report names it).
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.graph import default_opset, infer_shapes, tensor_value
from bnfold.nodes import attr, subgraphs

DOUBLE = TensorProto.DOUBLE
NARROW = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}  # widened to DOUBLE
_INT64_MAX = 2**63 - 1
_PLACEHOLDER_BYTES = 1024
_DTYPE_ATTRS = {"EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype",
                "Cast": "to"}
_FLOAT_BY_DEFAULT = {"RandomNormal", "RandomUniform"}  # their dtype attribute defaults to float


@dataclass
class Reference:
    """The widened model and what had to be done to run it in float64."""

    model: onnx.ModelProto
    # The main graph's large initializers: in the model as placeholders (external data at no
    # location), their values handed to onnxruntime as they are, never serialised. float32 and
    # float16 ones keep their type under a new name and a Cast widens them inside the graph:
    # exact, and onnxruntime (which copies what it is handed) then holds them once in their own
    # type, each float64 copy only while its layer runs, instead of the whole model in float64.
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    rewritten: Counter = field(default_factory=Counter)  # op type -> nodes rewritten in float64
    islands: Counter = field(default_factory=Counter)  # op type -> nodes left in their type

    def describe(self) -> str:
        text = "the original in float64"
        if self.rewritten:
            text += "; rewritten for float64: " + _counts(self.rewritten)
        if self.islands:
            text += "; kept in their own type (no float64 kernel): " + _counts(self.islands)
        return text


def _counts(counter: Counter) -> str:
    return ", ".join(f"{op} x{n}" if n > 1 else op for op, n in sorted(counter.items()))


def narrow_float(model: onnx.ModelProto) -> bool:
    """Whether the model has a float tensor narrower than float64 (else widening gains nothing)."""
    _, types = infer_shapes(model)
    return any(t in NARROW for t in types.values())


def widen(model: onnx.ModelProto, base_dir: str | os.PathLike | None) -> Reference:
    """A float64 copy of ``model`` (not modified); external data is read from ``base_dir``."""
    shapes, types = infer_shapes(model)
    opset = default_opset(model)
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    ref = Reference(out)
    widener = _Widener(ref, shapes, types, opset, {o.domain or "": o.version
                                                    for o in model.opset_import},
                       os.fspath(base_dir) if base_dir is not None else "")
    out.graph.CopyFrom(widener.graph(model.graph, top=True))
    return ref


class _Widener:
    def __init__(self, ref, shapes, types, opset, opsets, base_dir):
        self.ref, self.shapes, self.types = ref, shapes, types
        self.opset, self.opsets, self.base_dir = opset, opsets, base_dir
        self.counter = 0
        self.nodes: list[onnx.NodeProto] = []  # the nodes of the graph being widened

    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}__f64_{self.counter}"

    # -- graphs ------------------------------------------------------------------------------

    def graph(self, g: onnx.GraphProto, top: bool = False) -> onnx.GraphProto:
        new = onnx.GraphProto()
        new.name, new.doc_string = g.name, g.doc_string
        new.sparse_initializer.extend(map(self.sparse, g.sparse_initializer))
        self.widening: list[onnx.NodeProto] = []  # Casts of narrow placeholders, first
        if top:
            fed = {vi.name for vi in g.input}  # an initializer a caller may override
            for t in g.initializer:
                new.initializer.append(self.tensor(t, placeholder=True,
                                                   cast=t.name not in fed))
        else:
            new.initializer.extend(self.tensor(t) for t in g.initializer)
        new.node.extend(self.widening)
        for vi in g.input:
            new.input.append(_widened_info(vi))
        for vi in g.output:
            new.output.append(_widened_info(vi))
        if not top:  # a body's value types must stay declared for its formal outputs
            new.value_info.extend(_widened_info(vi) for vi in g.value_info)
        saved, self.nodes = self.nodes, []
        for node in g.node:
            self.node(node)
        new.node.extend(self.nodes)
        self.nodes = saved
        return new

    def tensor(self, t: onnx.TensorProto, placeholder: bool = False,
               cast: bool = False) -> onnx.TensorProto:
        if t.data_type not in NARROW:
            return t
        value = tensor_value(t, self.base_dir)
        if not placeholder or 8 * value.size < _PLACEHOLDER_BYTES:
            return numpy_helper.from_array(value.astype(np.float64), t.name)
        name, data_type = t.name, DOUBLE
        if cast and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            name, data_type = self.fresh(t.name), t.data_type
            self.widening.append(helper.make_node("Cast", [name], [t.name], to=DOUBLE,
                                                  name=self.fresh(f"{t.name}_widen")))
        else:
            value = value.astype(np.float64)
        self.ref.arrays[name] = value
        header = TensorProto(name=name, data_type=data_type, dims=t.dims,
                             data_location=TensorProto.EXTERNAL)
        for key, text in (("location", "bnfold-float64-reference"), ("offset", "0"),
                          ("length", str(value.nbytes))):
            header.external_data.add(key=key, value=text)
        return header

    def sparse(self, t: onnx.SparseTensorProto) -> onnx.SparseTensorProto:
        """A sparse tensor with its values widened (exactly): its indices as they are."""
        if t.values.data_type not in NARROW:
            return t
        wide = onnx.SparseTensorProto()
        wide.CopyFrom(t)
        wide.values.CopyFrom(self.tensor(t.values))
        return wide

    # -- nodes -------------------------------------------------------------------------------

    def node(self, node: onnx.NodeProto) -> None:
        narrow = [n for n in (*node.input, *node.output) if n and self.types.get(n) in NARROW]
        if not narrow and not any(True for _ in subgraphs(node)) and node.op_type != "Constant":
            self.nodes.append(node)  # nothing float in it: as it is
            return
        if node.op_type in ("Constant", "Cast", "CastLike", "Identity", "If", "Loop", "Scan") \
                or _runs_in_double(node, self._version(node.domain), self.types):
            self.nodes.append(self.widened(node))
            return
        rewrite = _REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rewrite is not None and rewrite(self, node):
            self.ref.rewritten[node.op_type] += 1
            return
        self.island(node)

    def _version(self, domain: str) -> int:
        return self.opsets.get("" if domain == "ai.onnx" else domain, 1)

    def widened(self, node: onnx.NodeProto) -> onnx.NodeProto:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        del new.attribute[:]
        dtype_attr = _DTYPE_ATTRS.get(node.op_type)
        for a in node.attribute:
            a2 = onnx.AttributeProto()
            a2.CopyFrom(a)
            if a.name == dtype_attr and a.i in NARROW:
                a2.i = DOUBLE
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type in NARROW:
                a2.t.CopyFrom(self.tensor(a.t))
            elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
                a2.sparse_tensor.CopyFrom(self.sparse(a.sparse_tensor))
            elif a.type == onnx.AttributeProto.GRAPH:
                a2.g.CopyFrom(self.graph(a.g))
            elif a.type == onnx.AttributeProto.GRAPHS:
                del a2.graphs[:]
                a2.graphs.extend(self.graph(g) for g in a.graphs)
            elif node.op_type == "Constant" and a.name in ("value_float", "value_floats"):
                value = np.asarray(a.f if a.name == "value_float" else list(a.floats),
                                   np.float32).astype(np.float64)
                a2 = helper.make_attribute("value", numpy_helper.from_array(value))
            new.attribute.append(a2)
        if node.op_type in _FLOAT_BY_DEFAULT and dtype_attr not in {a.name for a in node.attribute}:
            new.attribute.append(helper.make_attribute(dtype_attr, DOUBLE))
        return new

    def island(self, node: onnx.NodeProto) -> None:
        """Run ``node`` in its own types: Cast its widened inputs back, its outputs to double."""
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for i, name in enumerate(node.input):
            if name and self.types.get(name) in NARROW:
                narrow = self.fresh(name)
                self.nodes.append(helper.make_node("Cast", [name], [narrow],
                                                   to=self.types[name]))
                new.input[i] = narrow
        casts = []
        for i, name in enumerate(node.output):
            if name and self.types.get(name) in NARROW:
                narrow = self.fresh(name)
                new.output[i] = narrow
                casts.append(helper.make_node("Cast", [narrow], [name], to=DOUBLE))
        self.nodes.append(new)
        self.nodes.extend(casts)
        self.ref.islands[node.op_type] += 1

    def const(self, hint: str, value) -> str:
        name = self.fresh(hint)
        self.nodes.append(helper.make_node(
            "Constant", [], [name], value=numpy_helper.from_array(np.asarray(value))))
        return name

    def add(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        name = self.fresh(hint)
        self.nodes.append(helper.make_node(op, inputs, [name], **attrs))
        return name


def _widened_info(vi: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    new = onnx.ValueInfoProto()
    new.CopyFrom(vi)
    if new.type.HasField("tensor_type") and new.type.tensor_type.elem_type in NARROW:
        new.type.tensor_type.elem_type = DOUBLE
    return new


# -- which nodes onnxruntime runs in double ----------------------------------------------------

@functools.lru_cache(maxsize=1)
def _kernels() -> dict[tuple[str, str], list[tuple[int, int, dict[str, set[str]]]]]:
    from onnxruntime.capi import _pybind_state

    table: dict = {}
    for k in _pybind_state.get_all_opkernel_def():
        if k.provider != "CPUExecutionProvider":
            continue
        start, end = k.version_range
        table.setdefault((k.domain or "", k.op_name), []).append(
            (start, end, {c: set(v) for c, v in k.type_constraints.items()}))
    return table


def _runs_in_double(node: onnx.NodeProto, version: int, types: dict[str, int]) -> bool:
    """Whether onnxruntime's CPU provider has a kernel for ``node`` with its narrow floats
    (inputs and outputs) widened to double and every other value in its own type."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    try:
        schema = onnx.defs.get_schema(node.op_type, version, domain)
    except onnx.defs.SchemaError:
        return False
    wanted: dict[str, str] = {}
    for formals, actuals in ((schema.inputs, node.input), (schema.outputs, node.output)):
        for i, name in enumerate(actuals):
            if not name or not formals:
                continue
            formal = formals[min(i, len(formals) - 1)]  # the last one may be variadic
            elem = types.get(name)
            if elem is None:
                continue
            widened = DOUBLE if elem in NARROW else elem
            type_text = f"tensor({_type_name(widened)})"
            constraint = formal.type_str
            if constraint.startswith("tensor("):  # a fixed type: float stays float
                if elem in NARROW and type_text != constraint:
                    return False
                continue
            if wanted.setdefault(constraint, type_text) != type_text:
                return False
    for start, end, constraints in _kernels().get((domain, node.op_type), ()):
        if start <= schema.since_version <= end and all(
                c not in constraints or t in constraints[c] for c, t in wanted.items()):
            return True
    return False


def _type_name(elem: int) -> str:
    return {TensorProto.DOUBLE: "double", TensorProto.FLOAT: "float"}.get(
        elem, TensorProto.DataType.Name(elem).lower())


# -- rewrites of operators without a double kernel ---------------------------------------------

def _conv(w: _Widener, node: onnx.NodeProto) -> bool:
    """Conv as im2col: zero Pad, one strided Slice per kernel offset, Concat, one MatMul.

    X [N, C, S...] and W [M, C/G, K...] give columns [N, G, C/G * prod(K), L] (L the output's
    spatial size) and Y = W' [G, M/G, C/G * prod(K)] @ columns, reshaped to [N, M, S'...].
    """
    x, wname = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    wshape = w.shapes.get(wname)
    if w.opset < 11 or wshape is None or not all(isinstance(d, int) for d in wshape):
        return False
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return False  # SAME pads depend on the input size
    m, cg, *kernel = wshape
    nsp = len(kernel)
    group = attr(node, "group", 1)
    strides = list(attr(node, "strides", [1] * nsp))
    dilations = list(attr(node, "dilations", [1] * nsp))
    pads = list(attr(node, "pads", [0] * 2 * nsp)) if auto_pad == "NOTSET" else [0] * 2 * nsp
    if m % group:
        return False
    hint = node.output[0]
    axes = list(range(2, 2 + nsp))
    if any(pads):
        x = w.add("Pad", [x, w.const(hint, np.array([0, 0, *pads[:nsp], 0, 0, *pads[nsp:]],
                                                    np.int64))], hint)
    offsets = np.stack(np.meshgrid(*[np.arange(k) for k in kernel], indexing="ij"),
                       -1).reshape(-1, nsp)
    flat = w.const(hint, np.array([0, 0, 1, -1], np.int64))
    columns = []
    for offset in offsets:
        starts = [int(o) * d for o, d in zip(offset, dilations)]
        ends = [-(d * (k - 1 - int(o))) or _INT64_MAX
                for o, d, k in zip(offset, dilations, kernel)]
        if all(s == 0 for s in starts) and all(e == _INT64_MAX for e in ends) \
                and all(s == 1 for s in strides):
            piece = x
        else:
            piece = w.add("Slice", [x, w.const(hint, np.array(starts, np.int64)),
                                    w.const(hint, np.array(ends, np.int64)),
                                    w.const(hint, np.array(axes, np.int64)),
                                    w.const(hint, np.array(strides, np.int64))], hint)
        if not columns:
            first = piece
        columns.append(w.add("Reshape", [piece, flat], hint))  # [N, C, 1, L]
    stacked = columns[0] if len(columns) == 1 else w.add("Concat", columns, hint, axis=2)
    kk = len(offsets)
    grouped = w.add("Reshape", [stacked, w.const(hint, np.array([0, group, cg * kk, -1],
                                                                np.int64))], hint)
    # W [M, Cg, K...] -> [G, M/G, Cg * kk], the same (channel, offset) order as the columns.
    wr = w.add("Reshape", [wname, w.const(hint, np.array([group, m // group, cg * kk],
                                                         np.int64))], hint)
    product = w.add("MatMul", [wr, grouped], hint)  # [N, G, M/G, L]
    spatial = w.add("Slice", [w.add("Shape", [first], hint),
                              w.const(hint, np.array([2], np.int64)),
                              w.const(hint, np.array([_INT64_MAX], np.int64))], hint)
    shape = w.add("Concat", [w.const(hint, np.array([0, m], np.int64)), spatial], hint, axis=0)
    if bias is None:
        w.nodes.append(helper.make_node("Reshape", [product, shape], [node.output[0]]))
        return True
    y = w.add("Reshape", [product, shape], hint)
    b = w.add("Reshape", [bias, w.const(hint, np.array([m] + [1] * nsp, np.int64))], hint)
    w.nodes.append(helper.make_node("Add", [y, b], [node.output[0]]))
    return True


def _global_average_pool(w: _Widener, node: onnx.NodeProto) -> bool:
    shape = w.shapes.get(node.input[0])
    if shape is None:
        return False
    axes = list(range(2, len(shape)))
    if w.opset >= 18:
        w.nodes.append(helper.make_node("ReduceMean", [node.input[0], w.const(
            node.output[0], np.array(axes, np.int64))], [node.output[0]], keepdims=1))
    else:
        w.nodes.append(helper.make_node("ReduceMean", [node.input[0]], [node.output[0]],
                                        axes=axes, keepdims=1))
    return True


def _hard_sigmoid(w: _Widener, node: onnx.NodeProto, alpha=None, beta=None,
                  out: str | None = None) -> bool:
    """max(0, min(1, alpha * x + beta)), with Clip's min/max as inputs (opset 11+)."""
    if w.opset < 12:  # Clip has a double kernel from opset 12
        return False
    hint = node.output[0]
    # The attributes are float32 values, taken exactly; HardSwish's 1/6 is exact in double.
    alpha = np.float64(attr(node, "alpha", np.float32(0.2)) if alpha is None else alpha)
    beta = np.float64(attr(node, "beta", np.float32(0.5)) if beta is None else beta)
    scaled = w.add("Mul", [node.input[0], w.const(hint, alpha)], hint)
    shifted = w.add("Add", [scaled, w.const(hint, beta)], hint)
    w.nodes.append(helper.make_node(
        "Clip", [shifted, w.const(hint, np.float64(0)), w.const(hint, np.float64(1))],
        [out or node.output[0]]))
    return True


def _hard_swish(w: _Widener, node: onnx.NodeProto) -> bool:
    """x * HardSigmoid(x, alpha=1/6, beta=0.5)."""
    gate = w.fresh(node.output[0])
    if not _hard_sigmoid(w, node, alpha=1 / 6, beta=0.5, out=gate):
        return False
    w.nodes.append(helper.make_node("Mul", [node.input[0], gate], [node.output[0]]))
    return True


_REWRITES = {
    "Conv": _conv,
    "GlobalAveragePool": _global_average_pool,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
}


def float64_runs(model: onnx.ModelProto | str | os.PathLike, base_dir: str | None,
                 feed_sets: list[dict], verbose: bool = False) -> tuple[list[dict], str]:
    """The outputs of ``model`` in float64 on every draw, and what ran; raises Unavailable.

    ``model`` given by path is read here (its external data from its folder), and freed as
    soon as it is widened."""
    from bnfold.errors import BadInput, one_line
    from bnfold.verify.criterion import Unavailable
    from bnfold.verify.inputs import read_model
    from bnfold.verify.runtime import RunFailed, load_session, run_session

    if not isinstance(model, onnx.ModelProto):
        base_dir = os.path.dirname(os.path.abspath(os.fspath(model)))
        model = read_model(model)
    base_dir = base_dir or None
    if not narrow_float(model):
        raise Unavailable("the model has no float tensor narrower than float64")
    try:
        ref = widen(model, base_dir)
    except Exception as err:  # a model onnx itself cannot follow: no reference, say why
        raise Unavailable(f"cannot widen the model: {one_line(err)}") from None
    del model  # the only reference, for a model read from a path: free it now
    try:
        runner = load_session(ref.model, base_dir, verbose=verbose, initializers=ref.arrays)
        ref.arrays.clear()  # onnxruntime holds its own copy of what it was handed
        runs = [run_session(runner, {k: _wide(v) for k, v in feeds.items()})
                for feeds in feed_sets]
    except (RunFailed, BadInput) as err:
        raise Unavailable(f"onnxruntime cannot run it: {err}") from None
    return runs, ref.describe()


def _wide(value):
    if isinstance(value, np.ndarray) and (value.dtype.kind == "f" or
                                          value.dtype.name == "bfloat16"):
        return value.astype(np.float64)
    return value
