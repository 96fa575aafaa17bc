"""ModelProto plumbing shared by reading (`bnfold.io`) and writing (`bnfold.serialize`): walking
every tensor of a model, copying a model without its weights, external-data references, and
the few pieces of the protobuf wire format that let bnfold stream weights instead of copying
them into one serialized buffer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
from google.protobuf.message import Message
from onnx.external_data_helper import load_external_data_for_tensor

from bnfold.errors import BadInput
from bnfold.graph import is_external

PROTOBUF_LIMIT = 2**31 - 1  # protobuf cannot serialize or parse a message larger than this
GRAPH, INITIALIZER, RAW_DATA = 7, 5, 9  # field numbers: ModelProto.graph,
# GraphProto.initializer, TensorProto.raw_data


def tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the model: initializers (a sparse one's values, and its indices
    when they are external) and attributes, subgraphs, training_info graphs and functions. The
    main graph's (dense) initializers come first."""

    def in_sparse(sparse: onnx.SparseTensorProto) -> Iterator[onnx.TensorProto]:
        if sparse.HasField("values"):
            yield sparse.values
        # indices only when on disk, so that a save never moves them there: onnx.checker
        # cannot read a sparse tensor's indices from a data file
        if sparse.HasField("indices") and is_external(sparse.indices):
            yield sparse.indices

    def in_nodes(nodes) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for a in node.attribute:  # only the fields set are iterated: most are empty
                if a.HasField("t"):
                    yield a.t
                if a.tensors:
                    yield from a.tensors
                if a.HasField("sparse_tensor"):
                    yield from in_sparse(a.sparse_tensor)
                for sparse in a.sparse_tensors:
                    yield from in_sparse(sparse)
                if a.HasField("g"):
                    yield from in_graph(a.g)
                for g in a.graphs:
                    yield from in_graph(g)

    def in_graph(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield from in_sparse(sparse)
        yield from in_nodes(g.node)

    yield from in_graph(model.graph)
    for info in model.training_info:
        yield from in_graph(info.initialization)
        yield from in_graph(info.algorithm)
    for f in model.functions:
        yield from in_nodes(f.node)


def read_external_data(model: onnx.ModelProto, base_dir: str | os.PathLike) -> None:
    """Read every external tensor's data into the model (onnx's load_external_data_for_model
    does not walk sparse tensors or training_info graphs)."""
    for t in tensors(model):
        if is_external(t):
            load_external_data_for_tensor(t, os.fspath(base_dir))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]


@dataclass(frozen=True)
class External:
    """Where a tensor's bytes are: `length` bytes (None: to the end) from `offset` of `location`."""

    location: str
    offset: int
    length: int | None


def external(t: onnx.TensorProto, where: str = "") -> External:
    """The external-data reference of `t`; BadInput (prefixed with `where`) for an offset or
    length that is not a non-negative integer (onnx itself raises ValueError for those)."""
    entries = {e.key: e.value for e in t.external_data}
    numbers = {}
    for key in ("offset", "length"):
        text = entries.get(key)
        if text is None:
            continue
        if not text.strip().isdigit():
            raise BadInput(f"{where}external data of tensor '{t.name}': {key} '{text}' is not a "
                           f"non-negative integer")
        numbers[key] = int(text)
    return External(entries.get("location", ""), numbers.get("offset", 0),
                    numbers.get("length"))


def locations(model: onnx.ModelProto) -> list[str]:
    """The external-data locations the model's tensors name, each once, in order of use."""
    seen: dict[str, None] = {}
    for t in tensors(model):
        if is_external(t):
            seen.setdefault({e.key: e.value for e in t.external_data}.get("location", ""))
    return list(seen)


def nbytes(t: onnx.TensorProto) -> int | None:
    """The byte count of `t`'s data from its shape and type; None for types without a fixed
    item size (strings, 4-bit types)."""
    size = itemsize(t.data_type)
    return math.prod(t.dims) * size if size else None


def itemsize(data_type: int) -> int:
    size = _ITEMSIZE.get(data_type)
    if size is None:
        try:
            size = onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
        except (KeyError, ValueError, TypeError):
            size = 0
        _ITEMSIZE[data_type] = size
    return size


_ITEMSIZE: dict[int, int] = {}


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` but for its main graph's initializers (the bulk of a large model)."""
    shell = onnx.ModelProto()
    copy_fields(model, shell, skip="graph")
    copy_fields(model.graph, shell.graph, skip="initializer")
    return shell


def copy_fields(source: Message, target: Message, skip: str) -> None:
    """Copy every field set in `source` but `skip` (too costly to copy) into `target`.

    `skip` is never read: ListFields would return every set field's value, and reading a
    tensor's `raw_data` copies all its bytes out of protobuf."""
    for field in source.DESCRIPTOR.fields:
        if field.name == skip:
            continue
        if _repeated(field):
            if len(value := getattr(source, field.name)):
                getattr(target, field.name).extend(value)
        elif source.HasField(field.name):  # onnx's messages are proto2: every field has presence
            if isinstance(value := getattr(source, field.name), Message):
                getattr(target, field.name).CopyFrom(value)
            else:
                setattr(target, field.name, value)


def _repeated(field) -> bool:
    # protobuf 6 added `is_repeated`; later versions drop `label`
    return field.is_repeated if hasattr(field, "is_repeated") \
        else field.label == field.LABEL_REPEATED


def field_header(number: int, length: int) -> bytes:
    """The tag and length that open a length-delimited protobuf field (its payload follows)."""
    return varint_bytes(number << 3 | 2) + varint_bytes(length)


def varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def varint(data: bytes, pos: int) -> tuple[int | None, int]:
    """The varint at `pos` and the position after it; None if the data ends inside it."""
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
    return None, pos


def length_delimited(data, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of the length-delimited fields of the message in
    data[pos:end]; other fields are skipped."""
    while pos < end:
        key, pos = varint(data, pos)
        if key is None:
            return
        wire = key & 7
        if wire == 0:
            _, pos = varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = varint(data, pos)
            if size is None:
                return
            yield key >> 3, pos, pos + size
            pos += size
        else:
            return


def is_plain_name(location: str) -> bool:
    """A file name in the model's own directory (no folder part, not '.' or '..')."""
    return bool(location) and os.path.basename(location) == location \
        and location not in (os.curdir, os.pardir)
