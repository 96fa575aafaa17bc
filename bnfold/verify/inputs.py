"""The models' interfaces, and the inputs a check feeds them: drawn at random or given.

Random inputs come in draws. Draw 1 sizes every symbolic dimension with a fresh prime (2, 3, 5,
... skipping every integer dimension of the model, so a size equal to a channel count cannot hide
an axis bug) and draws floats from the standard normal; draw 2 sizes them all 1 and draws floats
in 0..255 (images: where float16 overflows). Further draws repeat the two with new seeds.

Integer inputs are drawn within what the graph does with them (`usage.py`): indices below the
dimension they index, shapes that fit their data, nonzero divisors... Strings are "s0", "s1", ...;
a sequence holds one or two tensors; an optional input is fed its element.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from bnfold.errors import BadInput, one_line
from bnfold.graph import FLOAT_TYPES
from bnfold.io import load_inputs
from bnfold.nodes import graphs
from bnfold.verify.usage import Use
from bnfold.wire import tensors

Model = onnx.ModelProto | str | os.PathLike

# No draw feeds more than this many bytes: symbolic sizes shrink (to 1 at worst) to fit.
INPUT_BYTES_LIMIT = 64 * 2**20


class CannotDraw(Exception):
    """Random inputs cannot be made for this model (the message says why): check regions."""


@dataclass(frozen=True)
class Value:
    """A graph input or output: name, type text ("tensor(float)", "seq(tensor(int64))"),
    element type and shape (of the tensor inside a sequence or optional)."""

    name: str
    type: str
    elem_type: int
    shape: tuple[int | str | None, ...] | None  # None when not declared; str for symbolic dims
    kind: str = "tensor"  # "tensor", "sequence", "optional", "optional sequence", or other
    proto: onnx.TypeProto | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Interface:
    inputs: list[Value]  # the inputs a caller must feed (initializers excluded)
    outputs: list[Value]
    dims: set[int]  # every integer dimension in the model, which symbolic sizes should avoid


@dataclass
class Draw:
    """One set of inputs and how it was made."""

    feeds: dict[str, object]
    description: str


def read_model(model: Model) -> onnx.ModelProto:
    """The model itself, or loaded from its path without its external data."""
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(os.fspath(model), load_external_data=False)
    except (OSError, DecodeError) as err:
        raise BadInput(f"cannot read {os.fspath(model)}: {one_line(err)}") from None


def interface(model: Model) -> Interface:
    model = read_model(model)
    graph = model.graph
    # An input that is also an initializer has a default (IR >= 4) or is a constant listed as
    # an input because IR < 4 required it: either way it is not fed.
    initialized = {t.name for t in graph.initializer}
    initialized |= {t.values.name for t in graph.sparse_initializer}
    dims: set[int] = set()
    for g in graphs(graph):
        for vi in (*g.input, *g.output, *g.value_info):
            dims.update(d for d in value(vi).shape or () if isinstance(d, int))
        dims.update(d for t in g.sparse_initializer for d in t.dims)
    dims.update(d for t in tensors(model) for d in t.dims)
    return Interface(
        inputs=[value(vi) for vi in graph.input if vi.name not in initialized],
        outputs=[value(vi) for vi in graph.output],
        dims=dims,
    )


def value(vi: onnx.ValueInfoProto) -> Value:
    # A copy of the type: a sub-message would keep the whole model (its weights) alive as long
    # as the Value lives, which is the whole check.
    own = onnx.TypeProto()
    own.CopyFrom(vi.type)
    kinds, tp = [], own
    while tp.WhichOneof("value") in ("sequence_type", "optional_type"):
        kinds.append(tp.WhichOneof("value").removesuffix("_type"))
        tp = getattr(tp, tp.WhichOneof("value")).elem_type
    kind = " ".join(kinds) or (tp.WhichOneof("value") or "unknown").removesuffix("_type")
    if tp.WhichOneof("value") != "tensor_type":
        return Value(vi.name, _type_text(own), 0, None, kind, own)
    tensor = tp.tensor_type
    shape = None
    if tensor.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        )
    return Value(vi.name, _type_text(own), tensor.elem_type, shape, kind or "tensor", own)


def _type_text(tp: onnx.TypeProto) -> str:
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        return f"tensor({TensorProto.DataType.Name(tp.tensor_type.elem_type).lower()})"
    if kind == "sequence_type":
        return f"seq({_type_text(tp.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({_type_text(tp.optional_type.elem_type)})"
    return (kind or "unknown").removesuffix("_type")


def check_same_interface(ref: Interface, cand: Interface) -> None:
    for kind, ref_values, cand_values in (
        ("input", ref.inputs, cand.inputs), ("output", ref.outputs, cand.outputs)
    ):
        r = {v.name: v for v in ref_values}
        c = {v.name: v for v in cand_values}
        if r.keys() != c.keys():
            only_ref, only_cand = sorted(r.keys() - c.keys()), sorted(c.keys() - r.keys())
            raise BadInput(
                f"the models' {kind}s differ: only in the reference: {', '.join(only_ref) or '-'}; "
                f"only in the candidate: {', '.join(only_cand) or '-'}"
            )
        for name, v in r.items():
            w = c[name]
            if v.type != w.type:
                raise BadInput(
                    f"{kind} '{name}' is {v.type} in the reference, {w.type} in the candidate"
                )
            ranks = [len(u.shape) for u in (v, w) if u.shape is not None]
            if kind == "input" and len(ranks) == 2 and ranks[0] != ranks[1]:
                raise BadInput(f"input '{name}' has rank {ranks[0]} in the reference, "
                               f"{ranks[1]} in the candidate")


# --- sizes ---------------------------------------------------------------------------------------

def dim_keys(inputs: list[Value]) -> list[str]:
    """The symbolic or unknown input dimensions, in order; an unnamed one is "input[axis]"."""
    keys: list[str] = []
    for v in inputs:
        for axis, d in enumerate(v.shape or ()):
            key = f"{v.name}[{axis}]" if d is None else d
            if isinstance(key, str) and key not in keys:
                keys.append(key)
    return keys


def check_dims(inputs: list[Value], dims: Mapping[str, int] | None) -> dict[str, int]:
    dims = dict(dims or {})
    bad = [f"{k}={v}" for k, v in dims.items()
           if not (isinstance(v, (int, np.integer)) and v >= 0)]
    if bad:
        raise BadInput(f"dimension sizes must be non-negative integers: {', '.join(bad)}")
    keys = dim_keys(inputs)
    unknown = sorted(dims.keys() - set(keys))
    if unknown:
        raise BadInput(f"unknown dimension {', '.join(unknown)} "
                       f"(the inputs' symbolic dimensions: {', '.join(keys) or 'none'})")
    return {k: int(v) for k, v in dims.items()}


def dim_sizes(
    inputs: list[Value], dims: Mapping[str, int] | None, avoid: set[int]
) -> dict[str, int]:
    """Size of each symbolic or unknown input dimension: from ``dims``, else a fresh prime.

    A default equal to a channel count could hide an axis bug, so defaults avoid every integer
    dimension of the model and the sizes the caller gave.
    """
    dims = check_dims(inputs, dims)
    fresh = (p for p in _primes() if p not in avoid | set(dims.values()))
    return {k: dims[k] if k in dims else next(fresh) for k in dim_keys(inputs)}


def _primes() -> Iterator[int]:
    yield 2
    n = 3
    while True:
        if all(n % p for p in range(3, int(n**0.5) + 1, 2)):
            yield n
        n += 2


def _shrink_to_fit(inputs: list[Value], sizes: dict[str, int], given: set[str]) -> dict[str, int]:
    """Lower the largest free sizes (to 1 at worst) until the inputs fit INPUT_BYTES_LIMIT."""
    sizes = dict(sizes)
    while _input_bytes(inputs, sizes) > INPUT_BYTES_LIMIT:
        free = [k for k in sizes if k not in given and sizes[k] > 1]
        if not free:
            break
        largest = max(free, key=lambda k: sizes[k])
        sizes[largest] = max(1, sizes[largest] // 2)
    return sizes


def _input_bytes(inputs: list[Value], sizes: dict[str, int]) -> int:
    total = 0
    for v in inputs:
        if v.shape is not None:
            count = math.prod(_shape(v, sizes))
            total += count * (8 if v.kind != "tensor" else _itemsize(v.elem_type)) * (
                2 if "sequence" in v.kind else 1)
    return total


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 8


def _shape(v: Value, sizes: Mapping[str, int]) -> list[int]:
    return [d if isinstance(d, int) else sizes[f"{v.name}[{axis}]" if d is None else d]
            for axis, d in enumerate(v.shape or ())]


# --- drawing -------------------------------------------------------------------------------------

# The draws cycle through these: symbolic sizes (fresh primes or all 1) and the floats' range.
_COMBOS = (("primes", "normal"), ("ones", "uniform 0..255"))


class InputMaker:
    """Draws inputs for one model; ``draw(i)`` is the i-th draw of a check."""

    def __init__(self, iface: Interface, dims: Mapping[str, int] | None, avoid: set[int],
                 seed: int, uses: dict[str, Use]):
        """``uses``: ``input_uses`` of the model."""
        self.inputs, self.seed = iface.inputs, seed
        given = check_dims(self.inputs, dims)
        self.given = set(given)
        self.sizes = {
            "primes": _shrink_to_fit(self.inputs, dim_sizes(self.inputs, given, avoid), self.given),
            "ones": {k: given.get(k, 1) for k in dim_keys(self.inputs)},
        }
        self.uses = uses

    def draw(self, index: int) -> Draw:
        size_kind, floats = _COMBOS[index % len(_COMBOS)]
        sizes, seed = self.sizes[size_kind], self.seed + index
        feeds = random_feeds(self.inputs, sizes, seed, floats, self.uses, index)
        text = f"seed {seed}"
        if sizes:
            text += ", " + ", ".join(f"{k}={v}" for k, v in sizes.items())
        if any(v.elem_type in FLOAT_TYPES for v in self.inputs):
            text += f", floats {floats}"
        return Draw(feeds, text)


def random_feeds(
    inputs: list[Value], sizes: Mapping[str, int], seed: int, floats: str = "normal",
    uses: Mapping[str, Use] | None = None, draw: int = 0,
) -> dict[str, object]:
    """One draw: floats standard normal (or uniform in 0..255), integers as their use allows
    (0..4 when unknown), random booleans, strings "s0", "s1"...; CannotDraw if a type cannot be
    drawn."""
    rng = np.random.default_rng(seed)
    uses = uses or {}
    feeds: dict[str, object] = {}
    shapes: dict[str, list[int]] = {}
    # Inputs whose values depend on another input's shape (a Reshape's target) go last.
    for v in sorted(inputs, key=lambda v: uses[v.name].after if v.name in uses else False):
        if v.shape is None and v.kind in ("tensor", "optional"):
            raise CannotDraw(f"input '{v.name}' has no declared shape")
        if v.elem_type == 0:
            raise CannotDraw(f"input '{v.name}' is {v.type}, which bnfold cannot draw")
        shape = _shape(v, sizes)
        shapes[v.name] = shape
        use = uses.get(v.name)
        count = 1 + int(rng.integers(0, 2)) if "sequence" in v.kind else None
        tensors_ = [_tensor(v, shape, rng, floats, use, sizes, shapes, draw)
                    for _ in range(count or 1)]
        feeds[v.name] = tensors_ if count else tensors_[0]
    return feeds


def _tensor(v: Value, shape: list[int], rng: np.random.Generator, floats: str, use: Use | None,
            sizes: Mapping[str, int], shapes: Mapping[str, list[int]], draw: int) -> np.ndarray:
    dtype = _dtype(v, CannotDraw)
    if use is not None:
        return use.values(shape, dtype, rng, sizes, shapes, draw)
    if v.elem_type in FLOAT_TYPES:
        if floats == "normal":
            return rng.standard_normal(shape).astype(dtype)
        return rng.uniform(0, 255, shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 5, shape).astype(dtype)
    if dtype.kind == "O":  # strings
        return np.array([f"s{i}" for i in range(math.prod(shape))], dtype=object).reshape(shape)
    raise CannotDraw(f"input '{v.name}' is {v.type}, which bnfold cannot draw")


def given_feeds(
    inputs: list[Value], given: str | os.PathLike | Mapping[str, np.ndarray]
) -> dict[str, object]:
    if not isinstance(given, Mapping):
        given = load_inputs(given)
    names = [v.name for v in inputs]
    missing = [n for n in names if n not in given]
    unknown = sorted(given.keys() - set(names))
    if missing or unknown:
        raise BadInput(
            f"inputs do not match the model: missing {', '.join(missing) or '-'}; "
            f"unknown {', '.join(unknown) or '-'}"
        )
    feeds: dict[str, object] = {}
    for v in inputs:
        item = given[v.name]
        if v.kind != "tensor" and (item is None or isinstance(item, (list, tuple))):
            feeds[v.name] = item if item is None else [np.asarray(a) for a in item]
            continue
        try:
            feeds[v.name] = np.asarray(item).astype(_dtype(v, BadInput), copy=False)
        except (TypeError, ValueError) as err:
            raise BadInput(
                f"input '{v.name}' cannot be cast to {v.type}: {one_line(err)}"
            ) from None
    return feeds


def _dtype(v: Value, error: type[Exception]) -> np.dtype:
    if v.elem_type == TensorProto.BFLOAT16:
        return np.dtype(ml_dtypes.bfloat16)
    if v.elem_type == TensorProto.STRING:
        return np.dtype(object)
    if v.elem_type == TensorProto.UNDEFINED:
        raise error(f"input '{v.name}' is {v.type}, which bnfold cannot feed")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.elem_type))
    if dtype.kind not in "fiub":  # float8, int4, complex...
        raise error(f"input '{v.name}' is {v.type}, which bnfold cannot feed")
    return dtype
