"""Run two models in onnxruntime on the same inputs and compare every output.

Both sessions run with graph optimizations disabled: otherwise onnxruntime fuses Conv+BN in the
reference too, and the check would compare bnfold's folding with onnxruntime's.

An output passes when ``|a - b| <= atol + rtol * |b|`` everywhere, in float64, with ``b`` the
reference. NaN against NaN and inf against inf of the same sign agree.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import TensorProto

from bnfold.errors import BadInput, one_line
from bnfold.graph import FLOAT_TYPES
from bnfold.nodes import graphs
from bnfold.report import OutputComparison, VerifyReport

Model = onnx.ModelProto | str | os.PathLike

# Default (atol, rtol) by output dtype: onnxruntime's op-test tolerances. atol is multiplied by the
# reference output's largest magnitude (at least 1): folding reorders rounding, and the rounding
# error of a deep model's output grows with the size of its values. Other dtypes compare exactly.
_TOLERANCES = {
    np.dtype(np.float16): (2.5e-3, 1e-3),
    np.dtype(ml_dtypes.bfloat16): (2e-2, 1e-2),
    np.dtype(np.float32): (1e-5, 1e-4),
    np.dtype(np.float64): (1e-10, 1e-8),
}
_PROVIDERS = ["CPUExecutionProvider"]
_PROTOBUF_LIMIT = 2**31 - 1  # a ModelProto larger than this cannot be serialised to bytes
_EXTERNAL_DIR_KEY = "session.model_external_initializers_file_folder_path"
_ORT_ERRORS = (RuntimeError, ValueError) + tuple(  # onnxruntime's errors derive from Exception
    v for v in vars(ort.capi.onnxruntime_pybind11_state).values()
    if isinstance(v, type) and issubclass(v, Exception)
)


def verify(
    reference: Model,
    candidate: Model,
    *,
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, int] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    runs: int = 1,
    base_dir: str | os.PathLike | None = None,
) -> VerifyReport:
    """Compare ``candidate`` with ``reference`` on the same inputs, output by output.

    ``inputs`` (an .npz path or a dict, cast to the declared types) replaces the random inputs,
    which are drawn ``runs`` times with seeds ``seed, seed + 1, ...``; ``dims`` sizes their
    symbolic dimensions. ``atol``/``rtol`` replace the defaults (by dtype, see ``_TOLERANCES``)
    for every output. ``base_dir`` is where in-memory models keep their external data.
    A mismatch gives a report that did not pass; models with different interfaces, inputs that
    do not fit and onnxruntime errors raise BadInput.
    """
    if runs < 1:
        raise BadInput(f"runs must be at least 1, not {runs}")
    if (atol is not None and not atol >= 0) or (rtol is not None and not rtol >= 0):
        raise BadInput(f"tolerances must be non-negative (atol {atol}, rtol {rtol})")
    ref, cand = _interface(reference), _interface(candidate)
    _check_same_interface(ref, cand)
    if inputs is None:
        sizes = _dim_sizes(ref.inputs, dims, avoid=ref.dims | cand.dims)
        feed_sets = [_random_feeds(ref.inputs, sizes, seed + i) for i in range(runs)]
        described = _describe_random(seed, runs, sizes)
    else:
        feed_sets = [_given_feeds(ref.inputs, inputs)]
        described = (
            "given inputs" if isinstance(inputs, Mapping) else f"inputs from {os.fspath(inputs)}"
        )
    ref_session = _session(reference, base_dir, "reference")
    cand_session = _session(candidate, base_dir, "candidate")
    results = [
        (_run(ref_session, feeds, f"the reference on {described}"),
         _run(cand_session, feeds, f"the candidate on {described}"))
        for feeds in feed_sets
    ]
    outputs = [
        _compare(t.name, [(r[t.name], c[t.name]) for r, c in results], atol, rtol)
        for t in ref.outputs
    ]
    return VerifyReport(outputs=outputs, inputs=described, runs=len(feed_sets))


def random_inputs(
    model: Model, *, dims: Mapping[str, int] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded random inputs for ``model`` as ``verify`` draws them; ``dims`` sizes symbolic dims."""
    iface = _interface(model)
    return _random_feeds(iface.inputs, _dim_sizes(iface.inputs, dims, iface.dims), seed)


def run(
    model: Model, feeds: Mapping[str, np.ndarray], *, base_dir: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
    """Run ``model`` once in onnxruntime, graph optimizations disabled; outputs by name."""
    return _run(_session(model, base_dir, "model"), feeds, "the model")


# --- the models' interfaces ------------------------------------------------------------------


@dataclass(frozen=True)
class _Value:
    """A graph input or output: name, type text ("tensor(float)"), element type and shape."""

    name: str
    type: str
    elem_type: int
    shape: tuple[int | str | None, ...] | None  # None when not declared; str for symbolic dims


@dataclass(frozen=True)
class _Interface:
    inputs: list[_Value]  # the inputs a caller must feed (initializers excluded)
    outputs: list[_Value]
    dims: set[int]  # every integer dimension in the model, which symbolic sizes should avoid


def _interface(model: Model) -> _Interface:
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
    dims.update(d for t in _tensors(model) for d in t.dims)
    return _Interface(
        inputs=[_value(vi) for vi in graph.input if vi.name not in initialized],
        outputs=[_value(vi) for vi in graph.output],
        dims=dims,
    )


def _value(vi: onnx.ValueInfoProto) -> _Value:
    kind = vi.type.WhichOneof("value")
    if kind != "tensor_type":
        return _Value(vi.name, (kind or "unknown").removesuffix("_type"), 0, None)
    tensor = vi.type.tensor_type
    shape = None
    if tensor.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        )
    type_text = f"tensor({TensorProto.DataType.Name(tensor.elem_type).lower()})"
    return _Value(vi.name, type_text, tensor.elem_type, shape)


def _tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    for g in graphs(model.graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _check_same_interface(ref: _Interface, cand: _Interface) -> None:
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


# --- inputs ----------------------------------------------------------------------------------


def _dim_sizes(
    inputs: list[_Value], dims: Mapping[str, int] | None, avoid: set[int]
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


def _describe_random(seed: int, runs: int, sizes: dict[str, int]) -> str:
    text = f"seed {seed}" if runs == 1 else f"seeds {seed}..{seed + runs - 1}"
    if sizes:
        text += "; " + ", ".join(f"{k}={v}" for k, v in sizes.items())
    return f"random inputs ({text})"


def _random_feeds(
    inputs: list[_Value], sizes: dict[str, int], seed: int
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


def _given_feeds(
    inputs: list[_Value], given: str | os.PathLike | Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    if not isinstance(given, Mapping):
        given = _load_npz(given)
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


def _load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise BadInput(f"cannot read inputs {os.fspath(path)}: {one_line(err)}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise BadInput(f"inputs {os.fspath(path)} is not an .npz archive")
    with data:
        return {name: data[name] for name in data.files}


def _dtype(v: _Value) -> np.dtype:
    if v.elem_type == TensorProto.BFLOAT16:
        return np.dtype(ml_dtypes.bfloat16)
    if v.elem_type == TensorProto.UNDEFINED or v.elem_type == TensorProto.STRING:
        raise BadInput(f"input '{v.name}' is {v.type}, which bnfold cannot feed")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.elem_type))
    if dtype.kind not in "fiub":  # float8, int4, complex...
        raise BadInput(f"input '{v.name}' is {v.type}, which bnfold cannot feed")
    return dtype


# --- running ---------------------------------------------------------------------------------


def _session(model: Model, base_dir: str | os.PathLike | None, role: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if isinstance(model, onnx.ModelProto):
            return _session_from_proto(model, base_dir, options, role)
        # By path, onnxruntime finds external data itself, however large the model.
        return ort.InferenceSession(os.fspath(model), options, providers=_PROVIDERS)
    except (*_ORT_ERRORS, OSError) as err:
        raise BadInput(f"onnxruntime cannot load the {role}: {one_line(err)}") from None


def _session_from_proto(
    model: onnx.ModelProto,
    base_dir: str | os.PathLike | None,
    options: ort.SessionOptions,
    role: str,
) -> ort.InferenceSession:
    external = any(t.data_location == TensorProto.EXTERNAL for t in _tensors(model))
    if external and base_dir is None:
        raise BadInput(f"the {role} keeps tensors in external data files: base_dir is needed")
    if model.ByteSize() <= _PROTOBUF_LIMIT:
        if external:
            options.add_session_config_entry(_EXTERNAL_DIR_KEY, os.path.abspath(base_dir))
        return ort.InferenceSession(model.SerializeToString(), options, providers=_PROVIDERS)
    # Too large to serialise: save a copy with all its tensors external and load it by path.
    # Rare (the CLI verifies saved files) and costly: the copy holds every tensor in memory.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        if external:
            onnx.load_external_data_for_model(copy, os.fspath(base_dir))
        path = os.path.join(tmp, "model.onnx")
        onnx.save(copy, path, save_as_external_data=True, location="model.onnx.data")
        del copy
        return ort.InferenceSession(path, options, providers=_PROVIDERS)


def _run(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], what: str
) -> dict[str, np.ndarray]:
    values = {name: _ort_value(np.asarray(array)) for name, array in feeds.items()}
    try:
        results = session.run_with_ort_values(None, values)
    except _ORT_ERRORS as err:
        raise BadInput(f"onnxruntime failed to run {what}: {one_line(err)}") from None
    return {o.name: _to_numpy(r, o.name) for o, r in zip(session.get_outputs(), results)}


def _ort_value(array: np.ndarray) -> ort.OrtValue:
    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:  # numpy has no bfloat16: hand onnxruntime the bits
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            array.view(np.uint16), TensorProto.BFLOAT16
        )
    return ort.OrtValue.ortvalue_from_numpy(array)


def _to_numpy(value: ort.OrtValue, name: str) -> np.ndarray:
    if not value.is_tensor():
        raise BadInput(f"output '{name}' is not a tensor: only tensor outputs can be compared")
    if value.data_type() == "tensor(bfloat16)":  # OrtValue.numpy() refuses it: copy the bits
        raw = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
        return np.frombuffer(raw, np.uint16).view(ml_dtypes.bfloat16).reshape(value.shape())
    try:
        return value.numpy()
    except _ORT_ERRORS:
        raise BadInput(
            f"output '{name}' is {value.data_type()}, which bnfold cannot compare"
        ) from None


# --- comparing -------------------------------------------------------------------------------


def _compare(
    name: str, pairs: list[tuple[np.ndarray, np.ndarray]], atol: float | None, rtol: float | None
) -> OutputComparison:
    """Compare one output over all runs; ``pairs`` holds (reference, candidate) arrays.

    max_rel leaves out positions where the reference is 0; needed_atol is the smallest atol that
    passes with this rtol, needed_rtol the smallest rtol with this atol (inf if none does).
    """
    ref = pairs[0][0]
    default_atol, default_rtol = _TOLERANCES.get(ref.dtype, (0.0, 0.0))
    rtol = default_rtol if rtol is None else rtol
    result = dict(name=name, dtype=str(ref.dtype), shape=list(ref.shape), rtol=float(rtol))
    for r, c in pairs:
        if r.shape != c.shape:
            inf = float("inf")
            return OutputComparison(
                **result, atol=float(default_atol if atol is None else atol), passed=False,
                max_abs=inf, max_rel=inf, needed_atol=inf, needed_rtol=inf,
                note=f"shape mismatch: reference {list(r.shape)}, candidate {list(c.shape)}",
            )
    err, mag, note = _differences(
        np.concatenate([c.ravel() for _, c in pairs]), np.concatenate([r.ravel() for r, _ in pairs])
    )
    if atol is None:
        atol = default_atol * max(1.0, float(mag.max(initial=0.0)))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = err[mag > 0] / mag[mag > 0]
        excess = err - atol
        needed_rtol = np.where(excess > 0, excess / mag, 0.0)  # inf where |b| = 0 < excess
    return OutputComparison(
        **result,
        atol=float(atol),
        passed=bool(np.all(err <= atol + rtol * mag)),
        max_abs=float(err.max(initial=0.0)),
        max_rel=float(rel.max(initial=0.0)),
        needed_atol=float(np.maximum(err - rtol * mag, 0.0).max(initial=0.0)),
        needed_rtol=float(needed_rtol.max(initial=0.0)),
        note=note,
    )


def _differences(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, str | None]:
    """|a - b| in float64 per element, |b| (0 where not finite), and a note on NaN/inf mismatches.

    The error is 0 where both agree (NaN and NaN, inf and inf of the same sign) and inf where
    they cannot (NaN or inf on one side only), so no tolerance passes it.
    """
    if a.dtype.kind in "OSU" or b.dtype.kind in "OSU":  # strings: equal or not
        return np.where(a == b, 0.0, np.inf), np.zeros(b.shape), None
    a, b = a.astype(np.float64), b.astype(np.float64)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    agree = (a == b) | (nan_a & nan_b)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(agree, 0.0, np.abs(a - b))
    err[np.isnan(err)] = np.inf
    notes = []
    for count, text in (
        (np.count_nonzero(nan_a & ~nan_b), "NaN in candidate only"),
        (np.count_nonzero(nan_b & ~nan_a), "NaN in reference only"),
        (np.count_nonzero(~agree & (np.isinf(a) | np.isinf(b)) & ~nan_a & ~nan_b), "inf mismatch"),
    ):
        if count:
            notes.append(f"{text} at {count} position{'s' if count > 1 else ''}")
    mag = np.where(np.isfinite(b), np.abs(b), 0.0)
    return err, mag, "; ".join(notes) or None
