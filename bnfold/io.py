"""The files bnfold reads and writes. Reading is here: models, with clear errors for every
unusable file (one line naming it), and `--inputs` archives. Writing is `bnfold.commit` (the
commit protocol: where files go, how they replace older ones) over `bnfold.serialize` (a
model's bytes); `save` and `staged` are re-exported here.

External data stays on disk: `load` leaves tensors pointing at their files, and `save` copies
those bytes in chunks into the output's own data file, so a model far larger than memory
passes through with a small, constant footprint.
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Callable

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from bnfold.errors import BadInput, one_line
from bnfold.graph import is_external
from bnfold.serialize import EXTERNAL_THRESHOLD
from bnfold.wire import (GRAPH, INITIALIZER, PROTOBUF_LIMIT, RAW_DATA, copy_fields, external,
                         is_plain_name, length_delimited, locations, nbytes, read_external_data,
                         tensors, varint, without_initializers)


def load(path: str | os.PathLike, *, load_external_data: bool = False, check: bool = True,
         progress: Callable[[str], None] | None = None) -> onnx.ModelProto:
    """Read the model at `path`; raise BadInput (one line, naming the file) if it is unusable."""
    path = os.fspath(path)
    base_dir = os.path.dirname(path)
    if progress:
        progress("loading")
    _check_regular(path, "")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise BadInput(f"{path}: cannot read ({err.strerror})") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError:
        raise BadInput(f"{path}: {_parse_failure(data)}") from None
    sizes = (_small_raw_sizes(model) or _raw_data_sizes(data)) if check else []
    del data
    if not model.ir_version and not model.HasField("graph"):
        raise BadInput(f"{path}: not an ONNX model (no IR version, no graph)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and not 1 <= opset <= onnx.defs.onnx_opset_version():
        raise BadInput(f"{path}: unsupported opset {opset} "
                       f"(bnfold supports 1..{onnx.defs.onnx_opset_version()})")
    # `tensors` yields the main graph's initializers first (protobuf's Python wrappers have no
    # stable identity to tell them by)
    main_initializers = len(model.graph.initializer)
    external_main = external_elsewhere = False
    for i, t in enumerate(tensors(model)):
        if is_external(t):
            _check_external(path, base_dir, t)
            if i < main_initializers:
                external_main = True
            else:
                external_elsewhere = True
    if check:
        if progress:
            progress("checking")
        _check(model, path, sizes, external_main, external_elsewhere)
    if load_external_data:
        read_external_data(model, base_dir)
    return model


def external_files(model: onnx.ModelProto, base_dir: str | os.PathLike) -> list[str]:
    """The paths of the external data files `model` reads (relative to `base_dir`), each once.
    Weights the fold pass spilled to scratch files (absolute locations) are not among them."""
    return [os.path.join(os.fspath(base_dir), location) for location in locations(model)
            if not os.path.isabs(location)]


def data_name(model: onnx.ModelProto) -> str | None:
    """The data file name the model's tensors use most (a plain name in its own directory):
    what an in-place save keeps."""
    counts: dict[str, int] = {}
    for t in tensors(model):
        if is_external(t):
            location = external(t).location
            counts[location] = counts.get(location, 0) + 1
    plain = [n for n in counts if is_plain_name(n)]
    return max(plain, key=lambda n: counts[n]) if plain else None


def model_argument(model, base_dir: str | os.PathLike | None = None
                   ) -> tuple[onnx.ModelProto, str | os.PathLike | None, bool]:
    """A model the API was given: a ModelProto as it is, or a path loaded with `load` (its
    external data left on disk, read from the model's folder unless `base_dir`). Returns the
    model, its base_dir and whether it was loaded here (so nobody else holds it). BadInput for
    anything else."""
    if isinstance(model, onnx.ModelProto):
        return model, base_dir, False
    if isinstance(model, (str, os.PathLike)):
        loaded = load(model)
        return loaded, base_dir or os.path.dirname(os.path.abspath(os.fspath(model))), True
    raise BadInput(f"expected an onnx.ModelProto or a path to a model, not "
                   f"{type(model).__name__}")


INPUT_PREFIX = "input__"


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive (name -> array), for `verify(inputs=...)`; BadInput, naming
    the file, for anything that is not an archive of plain numeric arrays. An archive with keys
    `input__NAME` (as models/*.npz, which also hold expected outputs) gives those arrays as the
    inputs NAME, and nothing else."""
    path = os.fspath(path)
    _check_regular(path, "inputs ")
    if os.path.getsize(path) == 0:
        raise BadInput(f"inputs {path}: empty file (expected an .npz archive)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise BadInput(f"cannot read inputs {path}: {one_line(err)}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise BadInput(f"inputs {path} is not an .npz archive")
    arrays = {}
    with archive:
        for name in archive.files:
            try:
                arrays[name] = archive[name]
            except ValueError as err:
                if "allow_pickle" in str(err):  # numpy's words for an object array
                    raise BadInput(f"inputs {path}: array '{name}' holds Python objects "
                                   f"(dtype object); save numeric arrays") from None
                raise BadInput(f"inputs {path}: array '{name}': {one_line(err)}") from None
            except (OSError, EOFError, zipfile.BadZipFile) as err:
                raise BadInput(f"inputs {path}: array '{name}' is unreadable "
                               f"({one_line(err)})") from None
    if not arrays:
        raise BadInput(f"inputs {path}: the archive holds no arrays")
    if any(name.startswith(INPUT_PREFIX) for name in arrays):  # models/*.npz: inputs and more
        return {name[len(INPUT_PREFIX):]: array for name, array in arrays.items()
                if name.startswith(INPUT_PREFIX)}
    return arrays


def _check_regular(path: str, what: str) -> None:
    """Refuse a path that is missing or not a regular file before opening it: reading a named
    pipe would wait for a writer forever."""
    if not path:
        raise BadInput(f"{what}'': empty file name")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput(f"{what}{path}: no such file") from None
    except OSError as err:
        raise BadInput(f"{what}{path}: cannot read ({err.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadInput(f"{what}{path}: cannot read (Is a directory)")
    if not stat.S_ISREG(st.st_mode):
        kind = "a named pipe" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
        raise BadInput(f"{what}{path}: not a regular file ({kind})")


def _check(model: onnx.ModelProto, path: str, sizes: list[int], external_main: bool,
           external_elsewhere: bool) -> None:
    """onnx.checker on the model's structure, without reading or copying its weights.

    The checker runs on a shell whose large initializers are empty tensors of the same name and
    type (on the model itself when it has none); what the checker would have checked of those
    (their byte count, `sizes`, read from the file by `_raw_data_sizes`: reading `raw_data`
    back from protobuf would copy it) is checked here. `external_main`, `external_elsewhere`:
    some main-graph initializer, some other tensor, is in external data.
    """
    if external_elsewhere:
        shell = path  # external data in subgraphs: let the checker read the file itself
    else:
        if len(sizes) != len(model.graph.initializer):  # an unusual layout: read them back
            sizes = [len(t.raw_data) if t.HasField("raw_data") else -1
                     for t in model.graph.initializer]
        if external_main or any(size > EXTERNAL_THRESHOLD for size in sizes):
            shell = _shell(model, path, sizes)
        else:  # the shell would hold every initializer whole: a copy of the model
            shell = model
    try:
        onnx.checker.check_model(shell, full_check=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = (str(err).strip().splitlines() or ["rejected by onnx.checker"])[0]
        raise BadInput(f"{path}: invalid model: {first}") from None


def _shell(model: onnx.ModelProto, path: str, sizes: list[int]) -> onnx.ModelProto:
    """`model` with its initializers over EXTERNAL_THRESHOLD (once their byte count, in
    `sizes`, is what their shape needs) and its external ones as empty tensors of the same name
    and type; small ones whole."""
    shell = without_initializers(model)
    for t, size in zip(model.graph.initializer, sizes):
        header = shell.graph.initializer.add()
        if is_external(t):  # its file and length were checked by _check_external
            copy_fields(t, header, skip="external_data")
            header.data_location = onnx.TensorProto.DEFAULT
        elif size > EXTERNAL_THRESHOLD:
            if size <= _SMALL_RAW:  # copying a few KB costs less than a field at a time
                header.CopyFrom(t)
                header.ClearField("raw_data")
            else:
                copy_fields(t, header, skip="raw_data")
            expected = nbytes(t)
            if expected is not None and size != expected:
                raise BadInput(f"{path}: invalid model: tensor '{t.name}' holds {size} "
                               f"bytes, its shape {list(t.dims)} needs {expected}")
        else:
            header.CopyFrom(t)
            continue
        del header.dims[:]
        header.dims.append(0)  # an empty tensor: valid without data
    return shell


def _check_external(path: str, base_dir: str, t: onnx.TensorProto) -> None:
    where = f"{path}: external data of tensor '{t.name}'"
    info = external(t, f"{path}: ")
    location = info.location
    escapes = os.pardir in os.path.normpath(location).split(os.sep)
    if not location or os.path.isabs(location) or escapes:
        raise BadInput(f"{where}: location '{location}' is not inside the model's directory")
    file = os.path.join(base_dir, location)
    if not os.path.exists(file):
        raise BadInput(f"{where}: file '{location}' not found")
    if not os.path.isfile(file):
        raise BadInput(f"{where}: '{location}' is not a regular file")
    size = os.path.getsize(file)
    needed = nbytes(t)
    length = info.length if info.length is not None else size - info.offset
    if info.offset + (info.length or 0) > size or length < 0:
        raise BadInput(f"{where}: ends past the end of '{location}' (truncated?)")
    if needed is not None and length != needed:
        raise BadInput(f"{where}: length {length} bytes, but its shape {list(t.dims)} needs "
                       f"{needed}")


def _parse_failure(data: bytes) -> str:
    """Tell a cut-off or damaged ModelProto from something that never was one."""
    if len(data) > PROTOBUF_LIMIT:
        return "larger than 2 GB in one file, which protobuf cannot parse (use external data)"
    fields = onnx.ModelProto.DESCRIPTOR.fields_by_number
    pos, seen = 0, 0
    while pos < len(data):
        key, pos = varint(data, pos)
        field = fields.get(key >> 3) if key is not None else None
        length_delimited_type = field is not None and field.type in (
            FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
        if field is None or (key & 7) != (2 if length_delimited_type else 0):
            break
        size, pos = varint(data, pos)
        if size is None or (length_delimited_type and pos + size > len(data)):
            return f"truncated or corrupt (the file ends inside '{field.name}')"
        pos += size if length_delimited_type else 0
        seen += 1
    if not seen:
        return "not an ONNX model (protobuf parse failed)"
    return "truncated or corrupt (protobuf parse failed)"


def _small_raw_sizes(model: onnx.ModelProto) -> list[int] | None:
    """`_raw_data_sizes`, read from the parsed model when every main-graph initializer is
    small (reading a small `raw_data` copies little; protobuf sizes a message without copying
    it); None otherwise."""
    sizes = []
    for t in model.graph.initializer:
        if t.ByteSize() > _SMALL_RAW:
            return None
        sizes.append(len(t.raw_data) if t.HasField("raw_data") else -1)
    return sizes or None


_SMALL_RAW = 64 << 10  # bytes


def _raw_data_sizes(data: bytes) -> list[int]:
    """The raw_data byte count (-1: none) of each main-graph initializer, read off the
    serialized ModelProto without copying any tensor."""
    view = memoryview(data)
    sizes = []
    for number, start, end in length_delimited(view, 0, len(view)):
        if number == GRAPH:
            for inner, t_start, t_end in length_delimited(view, start, end):
                if inner == INITIALIZER:
                    raw = [b - a for n, a, b in length_delimited(view, t_start, t_end)
                           if n == RAW_DATA]
                    sizes.append(raw[-1] if raw else -1)
    return sizes


from bnfold.commit import Stage, save, staged  # noqa: E402  (writing: re-exported, see above)

__all__ = ["Stage", "data_name", "external_files", "load", "load_inputs", "save", "staged"]
