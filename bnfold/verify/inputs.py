"""The models' interfaces, and the inputs a check feeds them: drawn at random or given."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from bnfold.errors import BadInput, one_line
from bnfold.graph import FLOAT_TYPES
from bnfold.io import load_inputs
from bnfold.nodes import graphs

Model = onnx.ModelProto | str | os.PathLike



@dataclass(frozen=True)
class Value:
    """A graph input or output: name, type text ("tensor(float)"), element type and shape."""

    name: str
    type: str
    elem_type: int
    shape: tuple[int | str | None, ...] | None  # None when not declared; str for symbolic dims


@dataclass(frozen=True)
class Interface:
    inputs: list[Value]  # the inputs a caller must feed (initializers excluded)
    outputs: list[Value]
    dims: set[int]  # every integer dimension in the model, which symbolic sizes should avoid


def interface(model: Model) -> Interface:
    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(os.fspath(model), load_external_data=False)
        except (OSError, DecodeError) as err:
            raise BadInput(f"cannot read {os.fspath(model)}: {one_line(err)}") from None
    graph = model.graph
    # An input that is also an initializer has a default (IR >= 4) or is a constant listed as
    # an input because IR < 4 required it: either way it is not fed.
    initialized = {t.name for t in graph.initializer}
    initialized |= {t.values.name for t in graph.sparse_initializer}
    dims: set[int] = set()
    for g in graphs(graph):
        for vi in (*g.input, *g.output, *g.value_info):
            dims.update(d for d in _value(vi).shape or () if isinstance(d, int))
        dims.update(d for t in g.sparse_initializer for d in t.dims)
    dims.update(d for t in tensors(model) for d in t.dims)
    return Interface(
        inputs=[_value(vi) for vi in graph.input if vi.name not in initialized],
        outputs=[_value(vi) for vi in graph.output],
        dims=dims,
    )


def _value(vi: onnx.ValueInfoProto) -> Value:
    kind = vi.type.WhichOneof("value")
    if kind != "tensor_type":
        return Value(vi.name, (kind or "unknown").removesuffix("_type"), 0, None)
    tensor = vi.type.tensor_type
    shape = None
    if tensor.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        )
    type_text = f"tensor({TensorProto.DataType.Name(tensor.elem_type).lower()})"
    return Value(vi.name, type_text, tensor.elem_type, shape)


def tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    for g in graphs(model.graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


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


def dim_sizes(
    inputs: list[Value], dims: Mapping[str, int] | None, avoid: set[int]
) -> dict[str, int]:
    """Size of each symbolic or unknown input dimension: from ``dims``, else a fresh odd prime.

    A default equal to a channel count could hide an axis bug, so defaults avoid every integer
    dimension of the model. An unnamed unknown dimension is keyed "input[axis]".
    """
    dims = dict(dims or {})
    bad = [f"{k}={v}" for k, v in dims.items()
           if not (isinstance(v, (int, np.integer)) and v >= 0)]
    if bad:
        raise BadInput(f"dimension sizes must be non-negative integers: {', '.join(bad)}")
    avoid = avoid | set(dims.values())  # nor repeat a size the caller gave
    fresh = (p for p in _odd_primes() if p not in avoid)
    sizes: dict[str, int] = {}
    for v in inputs:
        for axis, d in enumerate(v.shape or ()):
            key = f"{v.name}[{axis}]" if d is None else d
            if isinstance(key, str) and key not in sizes:
                sizes[key] = int(dims[key]) if key in dims else next(fresh)
    unknown = sorted(dims.keys() - sizes.keys())
    if unknown:
        raise BadInput(f"unknown dimension {', '.join(unknown)} "
                       f"(the inputs' symbolic dimensions: {', '.join(sizes) or 'none'})")
    return sizes


def _odd_primes() -> Iterator[int]:
    n = 3
    while True:
        if all(n % p for p in range(3, int(n**0.5) + 1, 2)):
            yield n
        n += 2


def describe_random(seed: int, runs: int, sizes: dict[str, int]) -> str:
    text = f"seed {seed}" if runs == 1 else f"seeds {seed}..{seed + runs - 1}"
    if sizes:
        text += "; " + ", ".join(f"{k}={v}" for k, v in sizes.items())
    return f"random inputs ({text})"


def random_feeds(
    inputs: list[Value], sizes: dict[str, int], seed: int
) -> dict[str, np.ndarray]:
    """Standard normal floats, integers in 0..4, random booleans."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in inputs:
        dtype = _dtype(v)
        if v.shape is None:
            raise BadInput(f"input '{v.name}' has no declared shape: pass inputs")
        shape = [
            d if isinstance(d, int) else sizes[f"{v.name}[{axis}]" if d is None else d]
            for axis, d in enumerate(v.shape)
        ]
        if v.elem_type in FLOAT_TYPES:
            feeds[v.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[v.name] = rng.integers(0, 2, shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[v.name] = rng.integers(0, 5, shape).astype(dtype)
        else:
            raise BadInput(f"input '{v.name}' is {v.type}: cannot draw random values, pass inputs")
    return feeds


def given_feeds(
    inputs: list[Value], given: str | os.PathLike | Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
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
    feeds = {}
    for v in inputs:
        try:
            feeds[v.name] = np.asarray(given[v.name]).astype(_dtype(v), copy=False)
        except (TypeError, ValueError) as err:
            raise BadInput(
                f"input '{v.name}' cannot be cast to {v.type}: {one_line(err)}"
            ) from None
    return feeds



def _dtype(v: Value) -> np.dtype:
    if v.elem_type == TensorProto.BFLOAT16:
        return np.dtype(ml_dtypes.bfloat16)
    if v.elem_type == TensorProto.UNDEFINED or v.elem_type == TensorProto.STRING:
        raise BadInput(f"input '{v.name}' is {v.type}, which bnfold cannot feed")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.elem_type))
    if dtype.kind not in "fiub":  # float8, int4, complex...
        raise BadInput(f"input '{v.name}' is {v.type}, which bnfold cannot feed")
    return dtype
