"""Writing a model's bytes: one protobuf file, or a small model file plus one data file.

Weights are streamed, never copied into one serialized buffer: a single-file model is written
one initializer at a time, and external data (the input's, or weights the fold pass spilled to
a scratch file) is copied in chunks, so a model far larger than memory passes through with a
small, constant footprint. Where the files go and how they replace older ones is
`bnfold.commit`'s business; this module only writes the two files it is given.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import BinaryIO, NamedTuple

import onnx

from bnfold.errors import BadInput
from bnfold.graph import is_external
from bnfold.wire import (GRAPH, INITIALIZER, PROTOBUF_LIMIT, RAW_DATA, copy_fields, external,
                         field_header, itemsize, tensors, without_initializers)

_CHUNK = 64 << 20  # bytes copied at a time from an input's external data
EXTERNAL_THRESHOLD = 1024  # in-memory tensors larger than this go to the data file too


class _Weights(NamedTuple):
    """What `write_model` needs to know of a model's tensors, from one walk over them."""

    shared: bool  # some tensor is in an external file of the input (not a fold's scratch file)
    external: bool  # some tensor is external (scratch files included)
    nbytes: int  # their data's size from the shapes (types of no fixed item size count 0)
    nbytes_padded: int  # the same, types of no fixed item size at 8 bytes an element


def _weights(model: onnx.ModelProto) -> _Weights:
    shared = external = False
    nbytes = padded = 0
    for t in tensors(model):
        count, size = math.prod(t.dims), itemsize(t.data_type)
        nbytes += count * size
        padded += count * (size or 8)
        if is_external(t):
            external = True
            shared = shared or not is_spilled(t)
    return _Weights(shared, external, nbytes, padded)


def needs_data_file(model: onnx.ModelProto, external_data: bool | None,
                    weights: _Weights) -> bool:
    """Whether `write_model` writes a data file: `external_data` if given, else when the model
    keeps tensors in external files (weights spilled to scratch files aside) or is too large for
    one protobuf. `weights`: `_weights(model)`."""
    if external_data is None:
        external_data = weights.shared
    return external_data or _too_large(model, weights.nbytes)


def write_model(model: onnx.ModelProto, path: str, *, data_name: str, base_dir: str | None,
                external_data: bool | None = None) -> bool:
    """Write `model` to `path`, and its large tensors to `data_name` beside it when
    `needs_data_file` (every in-memory tensor over 1 KiB joins the ones already external).
    Tensors still external are read relative to `base_dir`. Both files are fsynced; `model` is
    left as it was. Returns whether a data file was written."""
    weights = _weights(model)
    if not needs_data_file(model, external_data, weights):
        with _synced(path) as f:
            if not weights.external and weights.nbytes_padded <= _ONE_BUFFER:
                f.write(model.SerializeToString())  # one call: cheaper for many small tensors
            else:
                _write_inline(model, f)
        return False
    if base_dir is None and weights.shared:
        raise ValueError("save: the model has external data; pass base_dir (its directory)")
    with _synced(os.path.join(os.path.dirname(path), data_name)) as data_file:
        shell = _externalized(model, data_file, data_name, base_dir or "")
    with _synced(path) as model_file:
        model_file.write(shell.SerializeToString())
    return True


@contextmanager
def _synced(path: str) -> Iterator[BinaryIO]:
    """A new file at `path`, flushed to disk when the block ends without error."""
    with open(path, "xb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def is_spilled(t: onnx.TensorProto) -> bool:
    """Written to a scratch file by the fold pass (absolute location): data of this model, held
    on disk instead of in memory, not data the model shares with other files."""
    return is_external(t) and os.path.isabs(external(t).location)


def _too_large(model: onnx.ModelProto, nbytes: int) -> bool:
    """Whether `model`, whose tensor data is `nbytes` by the shapes, exceeds one protobuf."""
    # ByteSize() serializes the whole model with some protobuf builds: estimate from the tensor
    # shapes first, and measure only when the estimate is close to the limit.
    if nbytes < PROTOBUF_LIMIT // 2 or nbytes > PROTOBUF_LIMIT:
        return nbytes > PROTOBUF_LIMIT
    try:
        return model.ByteSize() > PROTOBUF_LIMIT
    except Exception:  # some protobuf builds refuse to even measure a message this large
        return True


_ONE_BUFFER = 64 << 20  # bytes of tensor data: a model this small is serialized in one buffer


def _write_inline(model: onnx.ModelProto, out: BinaryIO) -> None:
    """Serialize `model` to `out` as one protobuf, the main graph's initializers one at a time.

    Protobuf fields may come in any order, so the model without its graph, then the graph
    without its initializers, then each initializer (its header, then its bytes) parse as the
    same model: the weights are never copied into one serialized buffer, and spilled weights
    are copied from their scratch file.
    """
    shell = without_initializers(model)
    parts = []  # (tensor, its serialized header, the byte count of the data that follows it)
    for t in model.graph.initializer:
        header = onnx.TensorProto()
        if t.HasField("raw_data") and _small_and_plain(t):
            parts.append((t, _serialized_raw_last(t), None))
        elif is_spilled(t):
            copy_fields(t, header, skip="external_data")
            header.ClearField("data_location")
            parts.append((t, header.SerializeToString(), int(external(t).length)))
        elif t.HasField("raw_data") and itemsize(t.data_type):
            copy_fields(t, header, skip="raw_data")
            parts.append((t, header.SerializeToString(),
                          math.prod(t.dims) * itemsize(t.data_type)))
        else:  # typed fields or strings: small, written whole
            parts.append((t, t.SerializeToString(), None))
    sized = [(t, head, b"" if n is None else field_header(RAW_DATA, n), n or 0)
             for t, head, n in parts]
    body = sum(len(field_header(INITIALIZER, len(h) + len(f) + n)) + len(h) + len(f) + n
               for _, h, f, n in sized)
    graph_bytes = shell.graph.SerializeToString()
    shell.ClearField("graph")
    out.write(shell.SerializeToString())
    out.write(field_header(GRAPH, len(graph_bytes) + body))
    out.write(graph_bytes)
    buffer = memoryview(bytearray(_CHUNK))
    for t, head, data_field, length in sized:
        out.write(field_header(INITIALIZER, len(head) + len(data_field) + length))
        out.write(head)
        out.write(data_field)
        if is_spilled(t):
            info = external(t)
            with open(info.location, "rb") as src:
                _copy(src, info.offset, length, out, buffer)
        elif length:
            data = t.raw_data
            if len(data) != length:
                raise ValueError(f"tensor '{t.name}' holds {len(data)} bytes, not {length}")
            out.write(data)
            del data


_SMALL = 64 << 10  # bytes: a tensor this small is serialized whole


def _small_and_plain(t: onnx.TensorProto) -> bool:
    """Whether `t` is small, holds the bytes its shape needs (else the streaming path names it)
    and sets no field numbered after raw_data but data_location = DEFAULT (`fill` sets it)."""
    size = itemsize(t.data_type)
    expected = math.prod(t.dims) * size
    if not size or expected > _SMALL or t.data_location or len(t.external_data) \
            or t.HasField("doc_string") or len(t.metadata_props) or len(t.double_data) \
            or len(t.uint64_data):
        return False
    return len(t.raw_data) == expected


_DEFAULT_LOCATION = bytes([14 << 3, 0])  # data_location (field 14, a varint) = 0


def _serialized_raw_last(t: onnx.TensorProto) -> bytes:
    """`t` serialized whole (one C call) in the streaming path's layout: its header fields,
    then raw_data. Protobuf writes fields by number: only data_location follows raw_data."""
    whole = t.SerializeToString()
    if not t.HasField("data_location"):
        return whole
    head = len(whole) - len(_DEFAULT_LOCATION) - len(field_header(RAW_DATA, len(t.raw_data))) \
        - len(t.raw_data)
    return whole[:head] + _DEFAULT_LOCATION + whole[head:-len(_DEFAULT_LOCATION)]


def _externalized(model: onnx.ModelProto, out: BinaryIO, location: str,
                  base_dir: str) -> onnx.ModelProto:
    """A copy of `model` whose large tensors point at `location`, their bytes written to `out`.

    The copy is built without the data of the main graph's initializers (the bulk of any large
    model): their bytes go straight from `model`, or from its external files, to `out`.
    """
    shell = without_initializers(model)
    moves = []
    for t in model.graph.initializer:
        header = shell.graph.initializer.add()
        copy_fields(t, header, skip="raw_data")
        moves.append((t, header))
    # The other tensors (attributes, subgraphs) were copied whole; `tensors` yields them after
    # the main graph's initializers.
    moves += [(t, t) for t in list(tensors(shell))[len(moves):]]
    buffer = memoryview(bytearray(_CHUNK))  # reused: one chunk in memory at a time
    with ExitStack() as files:
        opened: dict[str, BinaryIO] = {}
        for source, target in moves:
            offset = out.tell()
            if is_external(source):
                info = external(source)
                file = os.path.join(base_dir, info.location)
                if file not in opened:
                    opened[file] = files.enter_context(open(file, "rb"))
                length = _copy(opened[file], info.offset, info.length, out, buffer)
            elif len(data := source.raw_data) > EXTERNAL_THRESHOLD:
                length = out.write(data)
                del data  # before the next tensor's bytes are read
            else:
                if target is not source and source.HasField("raw_data"):
                    target.raw_data = data
                continue
            target.ClearField("raw_data")
            del target.external_data[:]
            target.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", offset), ("length", length)):
                target.external_data.add(key=key, value=str(value))
    return shell


def _copy(src: BinaryIO, offset: int, length: int | None, out: BinaryIO,
          buffer: memoryview) -> int:
    """Copy `length` bytes (all to the end when None) from `offset` in `src`; return the count."""
    src.seek(offset)
    copied = 0
    while length is None or copied < length:
        n = src.readinto(buffer if length is None else buffer[: min(len(buffer), length - copied)])
        if not n:
            break
        out.write(buffer[:n])
        copied += n
    if length is not None and copied < length:
        raise BadInput(f"external data file '{src.name}' is shorter than the model says")
    return copied
