"""Set the running mean and variance of BatchNormalization nodes from data.

    mean_c = E[x_c],   var_c = E[(x_c - mean_c)^2]      (population variance)

over every sample and every axis of the BN's input but the channel axis 1 (only the samples for
per-activation BN, opset < 9 spatial=0), accumulated in float64 with Chan's parallel merge of
per-batch moments, stored in the statistics' own element type.

Exact (the default): a BN's statistics are those of its input when every calibrated BN upstream
of it already uses its new statistics. BNs are grouped in levels, a BN's level being the number of
calibrated BNs on the longest path before it; one pass over the data per level, on the model cut
at that level's BN inputs. Computing every BN input in one pass would use stale upstream
statistics: wrong for chained BNs. `method="batch"` is the one-pass approximation AIMET uses
(for torch): every calibrated BN normalises with its batch's statistics, and its new statistics
are the average of those batch statistics, weighted by batch size.

The model runs as in inference: a BN in training mode uses its running statistics upstream (the
statistics it is given are the ones inference will use). Only the statistics change: a
statistics initializer another node also reads (or a Constant, or an Identity of one) is
copied to a new initializer for the BN. BNs inside subgraphs are reported, not calibrated.

Passes run in onnxruntime with graph optimizations disabled, on a copy of the graph reduced to
what the pass needs; large weights are handed to onnxruntime as inputs, without a copy, so every
pass shares one copy of them and memory stays that of the model plus one batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.affine import cast_to, set_inference_mode, training_reason
from bnfold.data import Batches, batch_size_for, input_specs
from bnfold.errors import BadInput, one_line
from bnfold.graph import GraphView, NameAllocator, default_opset, free_names, is_external
from bnfold.nodes import attr, display_name, set_attr, subgraphs
from bnfold.report import BnCalibration, CalibrateReport, summary
from bnfold.verify.runtime import (EXTERNAL_DIR_KEY, new_session, ort_errors, ort_module,
                                   ort_to_numpy, ort_value)
from bnfold.wire import external

if TYPE_CHECKING:
    import onnxruntime as ort

METHODS = ("exact", "batch")

# Initializers larger than this are fed to each pass as inputs sharing one buffer, not copied
# into each pass's model.
_FED_BYTES = 4096

Progress = Callable[[int, int | None], None]  # (samples just processed, samples in all passes)


@dataclass
class _Target:
    """A BN being calibrated."""

    node: onnx.NodeProto
    report: BnCalibration
    old: list[np.ndarray]  # running mean, var (float64)
    dtypes: list[int]  # their element types
    exclusive: list[bool]  # its own initializer (updated in place), or copied to a new one
    level: int = 0
    count: int = 0  # values per channel accumulated so far
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None  # exact: sum of squared deviations; batch: sum of n * var

    @property
    def x(self) -> str:
        return self.node.input[0]

    def add(self, x: np.ndarray, method: str) -> None:
        """Merge one batch of the BN's input: Chan et al.'s update of (count, mean, M2); for
        the batch method M2 sums each batch's own n * variance instead."""
        shape = self.old[0].shape
        spatial = not self.report.per_activation
        if x.ndim < 2 or (x.shape[1:2] if spatial else x.shape[1:]) != (
                (int(np.prod(shape)),) if spatial else shape):
            raise BadInput(f"{self.report.node}: its input has shape {list(x.shape)}, its running "
                           f"mean {list(shape)}: they do not match on axis 1")
        axes = (0,) + tuple(range(2, x.ndim)) if spatial else (0,)
        x64 = x.astype(np.float64)
        n = x.size // x.shape[1] if spatial else x.shape[0]
        mean = x64.mean(axis=axes, keepdims=True)
        m2 = np.square(x64 - mean).sum(axis=axes)
        mean = mean.reshape(m2.shape)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(m2))):
            raise BadInput(f"{self.report.node}: its input holds NaN or infinity on this data")
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2
        if method == "exact":
            self.m2 += delta * delta * (self.count * n / total)
        self.count = total

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mean, self.m2 / self.count


def calibrate(model: onnx.ModelProto, data, *, only=(), method: str = "exact",
              batch_size: int | None = None, limit: int | None = None,
              base_dir: str | None = None, inplace: bool = False,
              progress: Progress | None = None) -> tuple[onnx.ModelProto, CalibrateReport]:
    """Set every BN's (or the `only` names/globs') running mean and variance from `data`.

    `data`: a mapping input name -> array (first axis: samples), the path of an `.npz` of one or
    of a folder of `.npy`/`.npz` files, or an iterable of feed dicts (an object with `get_next()`,
    onnxruntime's CalibrationDataReader, too). Batches of `batch_size` (default 32, or the
    inputs' fixed batch dimension), at most `limit` samples. `method`: "exact" (one pass per BN
    level) or "batch" (one pass, batch statistics averaged). Mutates `model` only with
    `inplace=True`. `progress(samples, total)` is told of each batch. BadInput for bad data.
    """
    if method not in METHODS:
        raise BadInput(f"unknown method '{method}': choose from {', '.join(METHODS)}")
    work = model if inplace else _copy(model)
    specs = input_specs(work)
    size = batch_size_for(specs, batch_size)
    batches = Batches(data, specs, size, limit, base_dir)
    report = CalibrateReport(method=method, data=batches.describe, batch_size=size)
    targets = _targets(work, only, base_dir, report)
    levels = _levels(work.graph, targets)
    try:
        weights = _Weights(work, base_dir)
        groups = [targets] if method == "batch" else [
            [t for t in targets if t.level == level] for level in range(levels)]
        passes = len(groups) if targets else 0
        batches.reread = passes > 1  # a source read once is kept on disk only if needed

        def tell(samples: int) -> None:
            if progress is not None:
                known = batches.known_samples
                progress(samples, None if known is None else known * passes)

        for index, group in enumerate(groups if targets else []):
            for target in group:
                target.report.pass_index = index + 1
            _run_pass(work, group, method, batches, weights, base_dir, tell)
            for target in group:
                _store(work, target, report)
        report.samples = batches.samples or 0
        report.passes = passes
        report.levels = levels
        if batches.dropped:
            report.notes.append(f"the last {batches.dropped} samples were left out: the model's "
                                f"fixed batch size is {size}")
    finally:
        batches.close()
    _collect_dead_constants(work, {c.split(" -> ")[0] for e in report.bns for c in e.copied})
    return work, report


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


# -- which BNs, and where their statistics live ----------------------------------------------------

def _is_bn(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def _targets(model: onnx.ModelProto, only, base_dir: str | None,
             report: CalibrateReport) -> list[_Target]:
    graph, opset = model.graph, default_opset(model)
    main = [n for n in graph.node if _is_bn(n)]
    nested = list(_nested_bns(graph, "main"))
    names = [display_name(n) for n in main] + [display_name(n) for n, _ in nested]
    if not names:
        raise BadInput("the model has no BatchNormalization node to calibrate")
    for pattern in only:
        if not any(name == pattern or fnmatchcase(name, pattern) for name in names):
            raise BadInput(f"--only {pattern}: matches no BatchNormalization "
                           f"(there are: {', '.join(names[:30])})")

    def chosen(node):
        name = display_name(node)
        return not only or any(name == p or fnmatchcase(name, p) for p in only)

    for node, where in nested:
        if chosen(node):
            report.bns.append(BnCalibration(
                node=display_name(node), graph=where, action="skipped",
                reason="inside a subgraph: its input is not a value of the main graph, so it "
                       "is not calibrated"))
    view = GraphView(model, graph, outer=None, base_dir=base_dir, allow_initializer_inputs=False,
                     shapes={}, types={}, names=NameAllocator(model))
    targets = []
    for node in main:
        if not chosen(node):
            continue
        entry = BnCalibration(node=display_name(node), graph="main", action="calibrated")
        entry.per_activation = opset < 9 and attr(node, "spatial", 1) == 0
        mode = training_reason(node, opset)
        if mode and not entry.per_activation:
            entry.note = f"{mode}: its running statistics are set"
        report.bns.append(entry)
        target = _target(view, node, entry)
        if isinstance(target, str):
            entry.action, entry.reason = "skipped", target
        else:
            targets.append(target)
    return targets


def _nested_bns(graph: onnx.GraphProto, path: str):
    for node in graph.node:
        for attr_name, sub in subgraphs(node):
            where = f"{path}/{display_name(node)}:{attr_name}"
            for inner in sub.node:
                if _is_bn(inner):
                    yield inner, where
            yield from _nested_bns(sub, where)


def _target(view: GraphView, node: onnx.NodeProto, entry: BnCalibration) -> _Target | str:
    if len(node.input) < 5 or not all(node.input[:5]):
        return "BatchNormalization without all five inputs"
    if node.input[0] in view.scope.initializers or node.input[0] in view.scope.constant_nodes:
        return "its input is a constant"
    old, dtypes, exclusive = [], [], []
    for role, name in (("running mean", node.input[3]), ("running variance", node.input[4])):
        value = view.constant(name)
        if isinstance(value, str):
            return f"{role}: {value}"
        old.append(np.asarray(value, dtype=np.float64))
        dtypes.append(view.constant_dtype(name) or helper.np_dtype_to_tensor_dtype(value.dtype))
        own = (name in view.scope.initializers and len(view.users(name)) == 1
               and list(node.input).count(name) == 1 and name not in view.outputs)
        exclusive.append(own)
    if old[0].shape != old[1].shape:
        return f"running mean {list(old[0].shape)} and variance {list(old[1].shape)} differ in shape"
    entry.old_mean, entry.old_var = summary(old[0]), summary(old[1])
    return _Target(node, entry, old, dtypes, exclusive)


def _levels(graph: onnx.GraphProto, targets: list[_Target]) -> int:
    """Set each target's level (calibrated BNs on the longest path before it); the count."""
    by_node = {id(t.node): t for t in targets}
    depth: dict[str, int] = {}
    for node in graph.node:  # ONNX graphs are topologically sorted
        reads = [n for n in node.input if n]
        for _, sub in subgraphs(node):
            reads += sorted(free_names(sub))
        target = by_node.get(id(node))
        if target is not None:
            target.level = depth.get(node.input[0], 0)
            target.report.level = target.level
            out = target.level + 1
        else:
            out = max((depth.get(n, 0) for n in reads), default=0)
        for o in node.output:
            if o:
                depth[o] = max(out, depth.get(o, 0))
    return max((t.level for t in targets), default=-1) + 1


# -- one pass --------------------------------------------------------------------------------------

class _Weights:
    """The model's large initializers as onnxruntime values, made once and shared by every pass:
    external data memory-mapped from its file, inline tensors read once."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | None):
        self.model, self.base_dir = model, base_dir or ""
        self.tensors = {t.name: t for t in model.graph.initializer}
        self.values: dict[str, ort.OrtValue] = {}
        self._arrays: dict[str, np.ndarray] = {}  # keep the buffers the values point into

    @staticmethod
    def fed(t: onnx.TensorProto) -> bool:
        size = int(np.prod(t.dims)) * 4  # an estimate is enough: large or not
        return is_external(t) or size > _FED_BYTES

    def value(self, name: str) -> ort.OrtValue:
        if name not in self.values:
            array = self._array(self.tensors[name])
            self._arrays[name] = array
            self.values[name] = ort_value(array)
        return self.values[name]

    def _array(self, t: onnx.TensorProto) -> np.ndarray:
        if is_external(t):
            info = external(t, "")
            dtype = _np_type(t.data_type)
            path = info.location if os.path.isabs(info.location) else \
                os.path.join(self.base_dir, info.location)
            if dtype is not None and t.data_type != TensorProto.STRING:
                try:
                    return np.memmap(path, dtype=dtype, mode="r", offset=info.offset,
                                     shape=tuple(t.dims))
                except (OSError, ValueError) as err:
                    raise BadInput(f"cannot read the data of '{t.name}': {one_line(err)}") from None
        return numpy_helper.to_array(t, self.base_dir)


def _np_type(data_type: int):
    if data_type == TensorProto.BFLOAT16:
        return ml_dtypes.bfloat16
    try:
        return helper.tensor_dtype_to_np_dtype(data_type)
    except (KeyError, ValueError):
        return None


def _run_pass(model: onnx.ModelProto, group: list[_Target], method: str, batches: Batches,
              weights: _Weights, base_dir: str | None, tell: Callable[[int], None]) -> None:
    inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    wanted = list(dict.fromkeys(t.x for t in group if t.x not in inputs))
    session, fed = (_session(model, wanted, group if method == "batch" else [], weights,
                             base_dir) if wanted else (None, []))
    feeds_needed = [i.name for i in session.get_inputs()] if session else []
    for batch in batches:
        values = dict(batch)
        if session is not None:
            feeds = {name: weights.value(name) for name in fed}
            for name in feeds_needed:
                if name not in feeds:
                    feeds[name] = ort_value(batch[name])
            try:
                results = session.run_with_ort_values(wanted, feeds)
            except ort_errors() as err:
                raise BadInput(f"onnxruntime failed on the data: {one_line(err)}") from None
            values.update((name, ort_to_numpy(r, name)) for name, r in zip(wanted, results))
        for target in group:
            target.add(values[target.x], method)
        tell(len(next(iter(batch.values()))))


def _session(model: onnx.ModelProto, outputs: list[str], batch_mode: list[_Target],
             weights: _Weights, base_dir: str | None) -> tuple[ort.InferenceSession, list[str]]:
    """A session computing `outputs` from the model's inputs, with the nodes they need only;
    `batch_mode` BNs normalise with batch statistics. Returns it and the weights it is fed."""
    graph = model.graph
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    keep: set[int] = set()
    stack = list(outputs)
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        index = producer.get(name)
        if index is None or index in keep:
            continue
        keep.add(index)
        node = graph.node[index]
        stack += [n for n in node.input if n]
        for _, sub in subgraphs(node):
            stack += sorted(free_names(sub))
    pass_model = onnx.ModelProto()
    pass_model.ir_version = max(model.ir_version, 4)  # initializers need not be listed
    pass_model.opset_import.extend(model.opset_import)
    pass_model.functions.extend(model.functions)
    g = pass_model.graph
    g.name = graph.name
    g.node.extend(graph.node[i] for i in sorted(keep))
    batch_nodes = {display_name(t.node) for t in batch_mode}
    opset = default_opset(model)
    read = {n for node in g.node for n in node.input}
    names = NameAllocator(model)
    for node in g.node:
        if not _is_bn(node):
            continue
        if display_name(node) in batch_nodes:
            extra = 2 if opset >= 14 else 4
            del node.output[1:]
            node.output.extend(names(f"{display_name(node)}.batch_stat") for _ in range(extra))
            if opset >= 14:
                set_attr(node, "training_mode", 1)
        elif (training_reason(node, opset) and not (opset < 9 and attr(node, "spatial", 1) == 0)
              and not read.intersection(node.output[1:])):
            set_inference_mode(node)
    used = set(seen)
    # BN statistics change between passes: always in the pass's model, never a shared value
    statistics = {n for node in g.node if _is_bn(node) for n in node.input[3:5]}
    fed = []
    for t in graph.initializer:
        if t.name not in used:
            continue
        if weights.fed(t) and t.name not in statistics:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            fed.append(t.name)
        else:
            g.initializer.append(t)
    g.sparse_initializer.extend(s for s in graph.sparse_initializer if s.values.name in used)
    initialized = {t.name for t in graph.initializer}
    initialized |= {s.values.name for s in graph.sparse_initializer}
    g.input.extend(i for i in graph.input if i.name in used and i.name not in initialized)
    g.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    ort = ort_module()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if base_dir:
        options.add_session_config_entry(EXTERNAL_DIR_KEY, os.path.abspath(base_dir))
    try:
        session = new_session(pass_model.SerializeToString(), options)
    except ort_errors() as err:
        raise BadInput(f"onnxruntime cannot load the model: {one_line(err)}") from None
    return session, fed


# -- writing the statistics --------------------------------------------------------------------------

def _store(model: onnx.ModelProto, target: _Target, report: CalibrateReport) -> None:
    entry = target.report
    mean, var = target.result()
    entry.samples = target.count
    stored = [cast_to(mean, target.dtypes[0]), cast_to(var, target.dtypes[1])]
    for role, value in zip(("mean", "variance"), stored):
        if isinstance(value, str):
            entry.action = "skipped"
            entry.reason = f"new running {role}: {value.replace('folded weights', 'value')}"
            return
    entry.new_mean, entry.new_var = summary(mean), summary(var)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    names = NameAllocator(model)
    for slot, key, value, own in zip((3, 4), ("running_mean", "running_var"), stored,
                                     target.exclusive):
        name = target.node.input[slot]
        if own:
            old = initializers[name]
            new = numpy_helper.from_array(value.reshape(tuple(old.dims)), name)
            new.doc_string = old.doc_string
            old.CopyFrom(new)
        else:
            fresh = names(f"{entry.node}.{key}")
            graph.initializer.append(numpy_helper.from_array(value.reshape(target.old[0].shape),
                                                             fresh))
            if model.ir_version < 4:  # IR < 4: initializers are listed as inputs too
                graph.input.append(helper.make_tensor_value_info(
                    fresh, target.dtypes[slot - 3], list(target.old[0].shape)))
            target.node.input[slot] = fresh
            entry.copied.append(f"{name} -> {fresh}")
            target.exclusive[slot - 3] = True
        entry.initializers.append(target.node.input[slot])


def _collect_dead_constants(model: onnx.ModelProto, released: set[str]) -> None:
    """Remove the Constant nodes that gave calibrated BNs their old statistics and that nothing
    reads any more (`released`: the names the BNs read before)."""
    graph = model.graph
    read = {o.name for o in graph.output}
    for node in graph.node:
        read.update(node.input)
        for _, sub in subgraphs(node):
            read |= free_names(sub)
    dead = released - read
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if node.op_type == "Constant" and node.output[0] in dead:
            del graph.node[index]
