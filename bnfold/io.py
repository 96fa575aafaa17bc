"""Reading and writing models: clear errors on load; atomic, streaming writes on save.

External data stays on disk: `load` leaves tensors pointing at their files, and `save` copies
those bytes in chunks into the output's own `<name>.data`, so a model far larger than memory
passes through with a small, constant footprint.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, MutableSequence
from contextlib import ExitStack, contextmanager
from typing import BinaryIO

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model

from bnfold.errors import BadInput
from bnfold.graph import MIN_OPSET, is_external

_PROTOBUF_LIMIT = 2**31 - 1  # protobuf cannot serialize or parse a message larger than this
_CHUNK = 64 << 20  # bytes copied at a time from an input's external data
_EXTERNAL_THRESHOLD = 1024  # in-memory tensors larger than this go to the sidecar too


def load(path: str | os.PathLike, *, load_external_data: bool = False, check: bool = True,
         progress: Callable[[str], None] | None = None) -> onnx.ModelProto:
    """Read the model at `path`; raise BadInput (one line, naming the file) if it is unusable."""
    path = os.fspath(path)
    base_dir = os.path.dirname(path)
    if progress:
        progress("loading")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except OSError as err:
        raise BadInput(f"{path}: cannot read ({err.strerror})") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError:
        raise BadInput(f"{path}: {_parse_failure(data)}") from None
    sizes = _raw_data_sizes(data) if check else []
    del data
    if not model.ir_version and not model.HasField("graph"):
        raise BadInput(f"{path}: not an ONNX model (no IR version, no graph)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise BadInput(f"{path}: unsupported opset {opset} "
                       f"(bnfold supports {MIN_OPSET}..{onnx.defs.onnx_opset_version()})")
    for t in _tensors(model):
        if is_external(t):
            _check_external(path, base_dir, t)
    if check:
        if progress:
            progress("checking")
        _check(model, path, sizes)
    if load_external_data:
        load_external_data_for_model(model, base_dir)
    return model


def save(model: onnx.ModelProto, path: str | os.PathLike, *, base_dir: str | None = None,
         external_data: bool | None = None) -> None:
    """Write `model` to `path` atomically; `model` itself is left as it was.

    Tensors still external are read relative to `base_dir` and streamed into `<path>.data`.
    A model with such tensors, or too large for one protobuf, is written with external data
    (`external_data` True or False decides instead): then every in-memory tensor over 1 KiB
    joins them in the sidecar. Weights the fold pass spilled to disk are streamed either way.
    """
    path = os.fspath(path)
    external = external_data
    if external is None:
        external = any(is_external(t) and not _is_spilled(t) for t in _tensors(model))
    if not external and not _too_large(model):
        with _atomic_write(path) as f:
            _write_inline(model, f)
        return
    if external and base_dir is None:
        raise ValueError("save: the model has external data; pass base_dir (its directory)")
    sidecar = path + ".data"
    with _atomic_write(path) as model_file:
        # The sidecar's rename precedes the model's: the new model never points at old data.
        with _atomic_write(sidecar) as data_file:
            shell = _externalized(model, data_file, os.path.basename(sidecar), base_dir or "")
            model_file.write(shell.SerializeToString())


class Staged:
    """A temporary home for a file on its way to `final` (see `staged`).

    It lives in a fresh directory beside `final` under `final`'s own name, so a model saved
    there names its sidecar as it will be named in place, and the final renames stay on one
    filesystem.
    """

    def __init__(self, final: str | os.PathLike):
        self.final = os.path.abspath(final)
        self._dir = tempfile.mkdtemp(dir=os.path.dirname(self.final), prefix=".bnfold-")
        self.path = os.path.join(self._dir, os.path.basename(self.final))
        self.discarded = False

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def discard(self) -> None:
        """Remove the temporaries; leaving the block then writes nothing."""
        shutil.rmtree(self._dir, ignore_errors=True)
        self.discarded = True

    def _commit(self) -> None:
        if os.path.exists(self.path + ".data"):  # the sidecar first, as in `save`
            os.replace(self.path + ".data", self.final + ".data")
        os.replace(self.path, self.final)


@contextmanager
def staged(path: str | os.PathLike) -> Iterator[Staged]:
    """Yield a temporary path for `path`: kept (renamed into place) only if the block succeeds."""
    stage = Staged(path)
    try:
        yield stage
        if not stage.discarded:
            stage._commit()
    finally:
        stage.discard()


def _check(model: onnx.ModelProto, path: str, sizes: list[int]) -> None:
    """onnx.checker on the model's structure, without reading or copying its weights.

    The checker runs on a shell whose large initializers are empty tensors of the same name and
    type; what the checker would have checked of those (their byte count, `sizes`, read from
    the file by `_raw_data_sizes`: reading `raw_data` back from protobuf would copy it) is
    checked here.
    """
    main = {id(t) for t in model.graph.initializer}
    if any(is_external(t) and id(t) not in main for t in _tensors(model)):
        shell = path  # external data in subgraphs: let the checker read the file itself
    else:
        shell = _without_initializers(model)
        if len(sizes) != len(model.graph.initializer):  # an unusual layout: read them back
            sizes = [len(t.raw_data) if t.HasField("raw_data") else -1
                     for t in model.graph.initializer]
        for t, size in zip(model.graph.initializer, sizes):
            header = shell.graph.initializer.add()
            if is_external(t):  # its file and length were checked by _check_external
                _copy_fields(t, header, skip="external_data")
                header.data_location = onnx.TensorProto.DEFAULT
            elif size > _EXTERNAL_THRESHOLD:
                _copy_fields(t, header, skip="raw_data")
                expected = math.prod(t.dims) * _itemsize(t.data_type)
                if _itemsize(t.data_type) and size != expected:
                    raise BadInput(f"{path}: invalid model: tensor '{t.name}' holds {size} "
                                   f"bytes, its shape {list(t.dims)} needs {expected}")
            else:
                header.CopyFrom(t)
                continue
            del header.dims[:]
            header.dims.append(0)  # an empty tensor: valid without data
    try:
        onnx.checker.check_model(shell, full_check=False)
    except onnx.checker.ValidationError as err:
        first = (str(err).strip().splitlines() or ["rejected by onnx.checker"])[0]
        raise BadInput(f"{path}: invalid model: {first}") from None


def _is_spilled(t: onnx.TensorProto) -> bool:
    """Written to a scratch file by the fold pass (absolute location): data of this model, held
    on disk instead of in memory, not data the model shares with other files."""
    return is_external(t) and os.path.isabs(ExternalDataInfo(t).location)


def _write_inline(model: onnx.ModelProto, out: BinaryIO) -> None:
    """Serialize `model` to `out` as one protobuf, the main graph's initializers one at a time.

    Protobuf fields may come in any order, so the model without its graph, then the graph
    without its initializers, then each initializer (its header, then its bytes) parse as the
    same model: the weights are never copied into one serialized buffer, and spilled weights
    are copied from their scratch file.
    """
    shell = _without_initializers(model)
    parts = []  # (tensor, its serialized header, the byte count of the data that follows it)
    for t in model.graph.initializer:
        header = onnx.TensorProto()
        if _is_spilled(t):
            _copy_fields(t, header, skip="external_data")
            header.ClearField("data_location")
            parts.append((t, header.SerializeToString(), int(ExternalDataInfo(t).length)))
        elif t.HasField("raw_data") and _itemsize(t.data_type):
            _copy_fields(t, header, skip="raw_data")
            parts.append((t, header.SerializeToString(),
                          math.prod(t.dims) * _itemsize(t.data_type)))
        else:  # typed fields or strings: small, written whole
            parts.append((t, t.SerializeToString(), None))
    sized = [(t, head, b"" if n is None else _field(_RAW_DATA, n), n or 0)
             for t, head, n in parts]
    body = sum(len(_field(_INITIALIZER, len(h) + len(f) + n)) + len(h) + len(f) + n
               for _, h, f, n in sized)
    graph_bytes = shell.graph.SerializeToString()
    shell.ClearField("graph")
    out.write(shell.SerializeToString())
    out.write(_field(_GRAPH, len(graph_bytes) + body))
    out.write(graph_bytes)
    buffer = memoryview(bytearray(_CHUNK))
    for t, head, data_field, length in sized:
        out.write(_field(_INITIALIZER, len(head) + len(data_field) + length))
        out.write(head)
        out.write(data_field)
        if _is_spilled(t):
            info = ExternalDataInfo(t)
            with open(info.location, "rb") as src:
                _copy(src, info.offset or 0, length, out, buffer)
        elif length:
            data = t.raw_data
            if len(data) != length:
                raise ValueError(f"tensor '{t.name}' holds {len(data)} bytes, not {length}")
            out.write(data)
            del data


_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9  # field numbers: ModelProto.graph,
# GraphProto.initializer, TensorProto.raw_data


def _field(number: int, length: int) -> bytes:
    """The tag and length that open a length-delimited protobuf field (its payload follows)."""
    return _varint_bytes(number << 3 | 2) + _varint_bytes(length)


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the model: initializers and attributes, subgraphs and functions."""

    def in_nodes(nodes) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from in_graph(g)

    def in_graph(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        yield from in_nodes(g.node)

    yield from in_graph(model.graph)
    for f in model.functions:
        yield from in_nodes(f.node)


def _check_external(path: str, base_dir: str, t: onnx.TensorProto) -> None:
    info = ExternalDataInfo(t)
    where, location = f"{path}: external data of tensor '{t.name}'", info.location
    escapes = os.pardir in os.path.normpath(location).split(os.sep)
    if not location or os.path.isabs(location) or escapes:
        raise BadInput(f"{where}: location '{location}' is not inside the model's directory")
    file = os.path.join(base_dir, location)
    if not os.path.isfile(file):
        raise BadInput(f"{where}: file '{location}' not found")
    if (info.offset or 0) + (info.length or 0) > os.path.getsize(file):
        raise BadInput(f"{where}: ends past the end of '{location}' (truncated?)")


def _parse_failure(data: bytes) -> str:
    """Tell a cut-off or damaged ModelProto from something that never was one."""
    if len(data) > _PROTOBUF_LIMIT:
        return "larger than 2 GB in one file, which protobuf cannot parse (use external data)"
    fields = onnx.ModelProto.DESCRIPTOR.fields_by_number
    pos, seen = 0, 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field = fields.get(key >> 3) if key is not None else None
        length_delimited = field is not None and field.type in (
            FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
        if field is None or (key & 7) != (2 if length_delimited else 0):
            break
        size, pos = _varint(data, pos)
        if size is None or (length_delimited and pos + size > len(data)):
            return f"truncated or corrupt (the file ends inside '{field.name}')"
        pos += size if length_delimited else 0
        seen += 1
    if not seen:
        return "not an ONNX model (protobuf parse failed)"
    return "truncated or corrupt (protobuf parse failed)"


def _raw_data_sizes(data: bytes) -> list[int]:
    """The raw_data byte count (-1: none) of each main-graph initializer, read off the
    serialized ModelProto without copying any tensor."""
    view = memoryview(data)
    sizes = []
    for number, start, end in _length_delimited(view, 0, len(view)):
        if number == _GRAPH:
            for inner, t_start, t_end in _length_delimited(view, start, end):
                if inner == _INITIALIZER:
                    raw = [b - a for n, a, b in _length_delimited(view, t_start, t_end)
                           if n == _RAW_DATA]
                    sizes.append(raw[-1] if raw else -1)
    return sizes


def _length_delimited(data, pos: int, end: int):
    """(field number, start, end) of the length-delimited fields of the message in
    data[pos:end]; other fields are skipped."""
    while pos < end:
        key, pos = _varint(data, pos)
        if key is None:
            return
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(data, pos)
            if size is None:
                return
            yield key >> 3, pos, pos + size
            pos += size
        else:
            return


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
    return None, pos


def _too_large(model: onnx.ModelProto) -> bool:
    # ByteSize() serializes the whole model with some protobuf builds: estimate from the tensor
    # shapes first, and measure only when the estimate is close to the limit.
    estimate = sum(math.prod(t.dims) * _itemsize(t.data_type) for t in _tensors(model))
    if estimate < _PROTOBUF_LIMIT // 2 or estimate > _PROTOBUF_LIMIT:
        return estimate > _PROTOBUF_LIMIT
    try:
        return model.ByteSize() > _PROTOBUF_LIMIT
    except Exception:  # some protobuf builds refuse to even measure a message this large
        return True


def _itemsize(data_type: int) -> int:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _atomic_write(path: str) -> Iterator[BinaryIO]:
    """A binary file beside `path` that replaces `path` if the block succeeds, else vanishes."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _externalized(model: onnx.ModelProto, out: BinaryIO, location: str,
                  base_dir: str) -> onnx.ModelProto:
    """A copy of `model` whose large tensors point at `location`, their bytes written to `out`.

    The copy is built without the data of the main graph's initializers (the bulk of any large
    model): their bytes go straight from `model`, or from its external files, to `out`.
    """
    shell = _without_initializers(model)
    moves = []
    for t in model.graph.initializer:
        header = shell.graph.initializer.add()
        _copy_fields(t, header, skip="raw_data")
        moves.append((t, header))
    # The other tensors (attributes, subgraphs) were copied whole; `_tensors` yields them after
    # the main graph's initializers.
    moves += [(t, t) for t in list(_tensors(shell))[len(moves):]]
    buffer = memoryview(bytearray(_CHUNK))  # reused: one chunk in memory at a time
    with ExitStack() as files:
        opened: dict[str, BinaryIO] = {}
        for source, target in moves:
            offset = out.tell()
            if is_external(source):
                info = ExternalDataInfo(source)
                file = os.path.join(base_dir, info.location)
                if file not in opened:
                    opened[file] = files.enter_context(open(file, "rb"))
                length = _copy(opened[file], info.offset or 0, info.length, out, buffer)
            elif len(data := source.raw_data) > _EXTERNAL_THRESHOLD:
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


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` but for its main graph's initializers (the bulk of a large model)."""
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip="graph")
    _copy_fields(model.graph, shell.graph, skip="initializer")
    return shell


def _copy_fields(source: Message, target: Message, skip: str) -> None:
    """Copy every field set in `source` but `skip` (too costly to copy) into `target`."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, MutableSequence):
            getattr(target, field.name).extend(value)
        elif isinstance(value, Message):
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


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
