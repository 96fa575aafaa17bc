"""Calibration data: samples for a model's inputs, read as batches, checked as they stream.

A source is one of
- a mapping name -> array (first axis = samples), or the path of an `.npz` holding one;
- the path of a folder of `.npz` files (each a mapping as above) and `.npy` files (each a
  chunk of samples of a model's only input), read in file-name order, `.npy` memory-mapped;
- an iterable of feed dicts (onnxruntime's CalibrationDataReader convention; an object with
  `get_next()` is read until it returns None), each a chunk of samples.

Chunks are cut and joined into batches of `batch_size` samples. Every batch is checked before it
is used: an array for every input, of the input's element type and static dimensions, the same
number of samples in each, no NaN or infinity. A source read once (an iterator, a reader) that
must be read several times is kept in a temporary folder (TMPDIR) as it is first read.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from bnfold.errors import BadInput, one_line

DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class InputSpec:
    """A graph input the data must feed."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None: rank unknown; None dims: symbolic

    def describe(self) -> str:
        dims = "?" if self.shape is None else ", ".join("?" if d is None else str(d)
                                                        for d in self.shape)
        return f"{self.dtype.name} [{dims}]"


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller feeds (an input that is also an initializer has a default)."""
    initialized = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in initialized:
            continue
        tensor = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tensor.elem_type:
            raise BadInput(f"input '{vi.name}' is not a typed tensor: bnfold cannot feed it")
        if tensor.elem_type == onnx.TensorProto.BFLOAT16:
            dtype = np.dtype(ml_dtypes.bfloat16)
        else:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        shape = None
        if tensor.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


def batch_size_for(specs: list[InputSpec], batch_size: int | None) -> int:
    """`batch_size` (default 32), or the fixed first dimension the inputs declare."""
    fixed = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
    if len(fixed) > 1:
        raise BadInput(f"the inputs declare different fixed batch sizes {sorted(fixed)}")
    if batch_size is not None and batch_size < 1:
        raise BadInput(f"batch size must be at least 1, got {batch_size}")
    if fixed:
        (size,) = fixed
        if batch_size is not None and batch_size != size:
            raise BadInput(f"the model's inputs have a fixed batch size of {size}: "
                           f"batch size {batch_size} cannot run")
        return size
    return batch_size or DEFAULT_BATCH_SIZE


class Batches:
    """Batches of checked samples, read again on each iteration (one pass over the data each).

    `describe` names the source; after a complete iteration `samples` is the number of samples
    read and `dropped` the samples of a last partial batch a fixed batch size could not run.
    """

    def __init__(self, data, specs: list[InputSpec], batch_size: int, limit: int | None = None,
                 base_dir: str | None = None):
        if limit is not None and limit < 1:
            raise BadInput(f"limit must be at least 1 sample, got {limit}")
        self.specs, self.batch_size, self.limit = specs, batch_size, limit
        self.fixed = any(s.shape and s.shape[0] is not None for s in specs)
        self.samples: int | None = None
        self.dropped = 0
        self.reread = True  # False: one pass only, a source read once needs no copy
        self._chunks, self.describe, self._once = _chunks_of(data, specs)
        self._spill: tempfile.TemporaryDirectory | None = None
        self._spilled: list[str] = []

    @property
    def known_samples(self) -> int | None:
        """The number of samples one pass reads, when known without reading the data."""
        counted = getattr(self._chunks, "samples", None)
        if self.samples is not None:
            counted = self.samples
        if counted is None:
            return None
        counted = min(counted, self.limit) if self.limit else counted
        return counted - counted % self.batch_size if self.fixed else counted

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self._spilled:
            for path in self._spilled:
                with np.load(path) as archive:
                    yield {name: archive[name] for name in archive.files}
            return
        if self._once and self.samples is not None:
            raise BadInput(f"{self.describe} can be read only once")
        keep = self._once and self.reread
        if keep:
            self._spill = tempfile.TemporaryDirectory(prefix="bnfold-calibrate-")
        count, index = 0, 0
        for batch in self._batches():
            count += len(next(iter(batch.values())))
            if keep:
                path = os.path.join(self._spill.name, f"{index:08d}.npz")
                np.savez(path, **batch)
                self._spilled.append(path)
                index += 1
            yield batch
        if count == 0:
            raise BadInput(f"{self.describe}: no samples (the data is empty)")
        self.samples = count

    def close(self) -> None:
        if self._spill is not None:
            self._spill.cleanup()
            self._spill, self._spilled = None, []

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        pending: list[dict[str, np.ndarray]] = []
        held, total = 0, 0
        for where, chunk in self._chunks():
            n = _check_chunk(where, chunk, self.specs)
            if self.limit is not None:
                n = min(n, self.limit - total)
            start = 0
            while start < n:
                take = min(n - start, self.batch_size - held)
                pending.append({k: v[start:start + take] for k, v in chunk.items()})
                held, start = held + take, start + take
                if held == self.batch_size:
                    yield _join(pending, where)
                    pending, held = [], 0
            total += n
            if self.limit is not None and total >= self.limit:
                break
        if held and self.fixed:
            self.dropped = held
        elif held:
            yield _join(pending, "the last batch")


def _join(pieces: list[dict[str, np.ndarray]], where: str) -> dict[str, np.ndarray]:
    batch = {name: np.ascontiguousarray(pieces[0][name]) if len(pieces) == 1
             else np.concatenate([p[name] for p in pieces]) for name in pieces[0]}
    for name, array in batch.items():
        if array.dtype.kind == "f" or array.dtype == ml_dtypes.bfloat16:
            finite = np.isfinite(array if array.dtype.kind == "f" else array.astype(np.float32))
            if not finite.all():
                sample = int(np.argwhere(~finite)[0][0])
                raise BadInput(f"{where}: input '{name}' has NaN or infinity "
                               f"(batch sample {sample})")
    return batch


def _check_chunk(where: str, chunk, specs: list[InputSpec]) -> int:
    """The number of samples in `chunk`, after checking it fits the inputs."""
    if not isinstance(chunk, Mapping):
        raise BadInput(f"{where}: expected a mapping input name -> array, got "
                       f"{type(chunk).__name__}")
    counts = {}
    for spec in specs:
        if spec.name not in chunk:
            have = ", ".join(map(str, chunk)) or "nothing"
            raise BadInput(f"{where}: no data for input '{spec.name}' (it holds {have})")
        array = chunk[spec.name]
        if not isinstance(array, np.ndarray):
            array = np.asarray(array)
        if array.dtype != spec.dtype:
            raise BadInput(f"{where}: input '{spec.name}' is {array.dtype.name}, the model "
                           f"takes {spec.dtype.name}")
        if array.ndim == 0:
            raise BadInput(f"{where}: input '{spec.name}' is a scalar; its first axis must "
                           f"count samples")
        if spec.shape is not None:
            fits = len(spec.shape) == array.ndim and all(
                d is None or d == n for d, n in zip(spec.shape[1:], array.shape[1:]))
            if not fits:
                shape = ", ".join(map(str, array.shape))
                raise BadInput(f"{where}: input '{spec.name}' has shape [{shape}], the model "
                               f"takes {spec.describe()} (first axis: samples)")
        counts[spec.name] = array.shape[0]
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise BadInput(f"{where}: the inputs hold different numbers of samples ({listed})")
    return next(iter(counts.values()), 0)


# -- sources ---------------------------------------------------------------------------------

def _chunks_of(data, specs: list[InputSpec]) -> tuple[Callable, str, bool]:
    """(a function yielding (where, chunk) pairs afresh, a description, read-once?)."""
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if os.path.isdir(path):
            return _folder(path, specs), f"folder {path}", False
        return _npz_file(path, specs), path, False
    if isinstance(data, Mapping):
        chunks = lambda: iter([("the data", data)])
        chunks.samples = _first_axis(data, specs)
        return chunks, "the data", False
    if hasattr(data, "get_next"):
        reader = iter(data.get_next, None)
        return _numbered(reader), f"{type(data).__name__}", True
    if isinstance(data, Iterable):
        once = iter(data) is data
        return (_numbered(data) if once else lambda: _numbered(data)()), "the feeds", once
    raise BadInput(f"calibration data must be a path, a mapping of arrays or an iterable of "
                   f"feed dicts, got {type(data).__name__}")


def _first_axis(mapping: Mapping, specs: list[InputSpec]) -> int | None:
    for spec in specs:
        array = mapping.get(spec.name)
        if getattr(array, "ndim", 0):
            return int(array.shape[0])
    return None


def _numbered(feeds: Iterable) -> Callable[[], Iterator[tuple[str, Mapping]]]:
    def chunks():
        for i, feed in enumerate(feeds):
            yield f"feed {i}", feed
    return chunks


def _npz_file(path: str, specs: list[InputSpec]) -> Callable[[], Iterator[tuple[str, Mapping]]]:
    def chunks():
        yield path, _load_npz(path)
    chunks.samples = _first_axis(_load_npz(path), specs)  # and its errors now, before any work
    return chunks


def _folder(path: str, specs: list[InputSpec]) -> Callable[[], Iterator[tuple[str, Mapping]]]:
    files = sorted(f for f in os.listdir(path)
                   if f.endswith((".npy", ".npz")) and not f.startswith("."))
    if not files:
        raise BadInput(f"data folder {path}: no .npy or .npz files")
    if any(f.endswith(".npy") for f in files) and len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise BadInput(f"data folder {path}: a .npy file holds one array, the model has inputs "
                       f"{names}: use .npz files (one array per input)")

    def chunks():
        for name in files:
            file = os.path.join(path, name)
            if name.endswith(".npz"):
                yield file, _load_npz(file)
            else:
                yield file, {specs[0].name: _load_npy(file)}

    samples = 0
    for name in files:  # headers only: .npy is memory-mapped, .npz arrays are not read
        file = os.path.join(path, name)
        if name.endswith(".npy"):
            samples += _load_npy(file).shape[0] if _load_npy(file).ndim else 0
        else:
            samples = None
            break
    chunks.samples = samples
    return chunks


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise BadInput(f"cannot read data {path}: {one_line(err)}") from None


def _load_npz(path: str) -> dict[str, np.ndarray]:
    from bnfold.io import load_inputs  # its errors name the file and what is wrong with it

    try:
        return load_inputs(path)
    except BadInput as err:
        raise BadInput(str(err).replace("inputs ", "data ", 1)) from None
    except (zipfile.BadZipFile, OSError) as err:
        raise BadInput(f"cannot read data {path}: {one_line(err)}") from None
