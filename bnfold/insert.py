"""Insert a BatchNormalization after chosen Dense layers, for training with batch norm.

    y = gamma * (x - mean) / sqrt(var + eps) + beta      per feature (Keras axis=-1)

ONNX BN normalises axis 1. A Dense output [B, F] is normalised directly; [B, T, ..., F] goes through
Transpose(perm=[0, r-1, 1, ..., r-2]) -> BN -> Transpose back, which only moves data: exact.
Momentum is ONNX's (and Keras's): running = running * momentum + batch * (1 - momentum); torch's
BatchNorm momentum m is 1 - m here (torch's default 0.1 is 0.9).

Two forms. The default is inference mode (running statistics), the form a trainer takes: each BN's
scale and shift (gamma, beta) are trainable, its running mean and variance are state the trainer
updates (frozen for the optimizer), and the report names both. `training=True` writes the ONNX
training-mode form (BN-15 training_mode=1, as torch.onnx.export writes in TrainingMode.TRAINING):
batch statistics, the updated running statistics as extra graph outputs for a loop that runs the
graph and feeds them back. `bnfold fold --training-to-inference` turns it back.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.dense import DENSE_OPS, Layer, find_layers
from bnfold.errors import BadInput, VerificationFailed, one_line
from bnfold.graph import (FLOAT_TYPES, MIN_OPSET, NameAllocator, default_opset, infer_shapes,
                          rename_all)
from bnfold.io import model_argument
from bnfold.report import VerifyReport
from bnfold.verify import verify

TRAINING_OPSET = 15  # training_mode (14) with running statistics typed apart from X (15)

PRESETS = {  # (epsilon, momentum in the ONNX convention)
    "keras": (1e-3, 0.99),
    "torch": (1e-5, 0.9),  # torch's momentum 0.1
}

_MAX_LISTED = 30  # candidates named in a "matches nothing" error


@dataclass
class Insertion:
    """One inserted BatchNormalization."""

    layer: str  # the Dense layer's name
    op: str  # its op: Gemm, MatMul, Conv, ConvTranspose
    features: int
    follows: str  # what the BN reads: "layer" or the activation's op, e.g. "Relu"
    input: str  # the tensor the BN reads, as named in the output model
    output: str  # the tensor its normalised result is in (the Transpose back's, when there is one)
    node: str  # the BatchNormalization node
    params: dict[str, str]  # gamma, beta, mean, var -> initializer name
    transpose: list[int] | None = None  # perm of the Transpose pair around the BN (rank >= 3)
    axis: int | None = None  # the axis of the layer's output the BN normalises (non-negative)
    channels: int | None = None  # its size: the BN's parameter count (features, by default)
    running_outputs: list[str] = field(default_factory=list)  # graph outputs (training mode)
    note: str | None = None

    def describe(self) -> str:
        where = "its output" if self.follows == "layer" else f"its {self.follows}"
        text = f"{self.layer} ({self.op}, {self.features} features): {self.node} after {where}"
        if self.channels is not None and self.channels != self.features:
            text += f"; normalises axis {self.axis} ({self.channels} channels)"
        if self.transpose is not None:
            rank = len(self.transpose)
            why = (f"features are the last axis of a rank-{rank} output"
                   if self.axis == rank - 1 else f"the axis is not axis 1 of a rank-{rank} output")
            text += (f"; {why}, so the BN sits between Transpose {self.transpose} and its "
                     f"inverse (exact)")
        if self.running_outputs:
            text += f"; running statistics in outputs {', '.join(self.running_outputs)}"
        return text + (f" ({self.note})" if self.note else "")


@dataclass
class InsertReport:
    """Everything `insert` did, for people (``to_text``) and pipelines (``to_dict``)."""

    insertions: list[Insertion] = field(default_factory=list)
    epsilon: float = 0.0
    momentum: float = 0.0
    training: bool = False
    identity: bool = False
    opset: int = 0  # of the output model
    upgraded_from: int | None = None  # the input's opset when --training upgraded it
    verification: VerifyReport | None = None  # --identity: output checked against the input
    notes: list[str] = field(default_factory=list)

    @property
    def trainable(self) -> list[str]:
        """The inserted scale and shift initializers (gamma, beta): what an optimizer trains."""
        return [i.params[k] for i in self.insertions for k in ("gamma", "beta")]

    @property
    def state(self) -> list[str]:
        """The inserted running mean and variance initializers: state the BN updates itself in
        training, not trained by the optimizer (onnxruntime-training: `frozen_params`)."""
        return [i.params[k] for i in self.insertions for k in ("mean", "var")]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inserted"] = len(self.insertions)
        data["trainable"], data["state"] = self.trainable, self.state
        data["verification"] = self.verification.to_dict() if self.verification else None
        return data

    def to_text(self) -> str:
        mode = "training" if self.training else "inference"
        lines = [f"inserted {len(self.insertions)} BatchNormalization ({mode} mode, "
                 f"epsilon {self.epsilon:g}, momentum {self.momentum:g}, opset {self.opset})"]
        lines += ["  " + i.describe() for i in self.insertions]
        if self.insertions:
            lines.append(f"trainable (scale, shift): {', '.join(self.trainable)}")
            lines.append(f"state (running mean, variance; the trainer updates them, freeze them "
                         f"for the optimizer): {', '.join(self.state)}")
        if self.upgraded_from is not None:
            lines.append(f"opset upgraded {self.upgraded_from} -> {self.opset} for training mode "
                         f"(checked equivalent with onnxruntime)")
        lines += self.notes
        if self.verification is not None:
            lines.append(self.verification.to_text())
        return "\n".join(lines)


@dataclass
class _Settings:
    epsilon: float
    momentum: float
    gamma: float
    beta: float
    mean: float
    var: float
    identity: bool
    training: bool
    before_activation: bool
    axis: int | None = None  # of the layer's output; None: its feature axis


def insert(model: onnx.ModelProto | str | os.PathLike, *, after=(), ops=(),
           all_layers: bool = False, before_activation: bool = False, epsilon: float | None = None,
           momentum: float | None = None, preset: str = "keras", gamma: float = 1.0,
           beta: float = 0.0, mean: float = 0.0, var: float = 1.0, training: bool = False,
           identity: bool = False, base_dir: str | None = None, axis: int | None = None
           ) -> tuple[onnx.ModelProto, InsertReport]:
    """Put a BatchNormalization after each selected layer; never mutates `model` (a ModelProto
    or a path, loaded by `bnfold.load`).

    Selection: `after` names or globs (fnmatch) over layer names, `ops` (restricts the layers to
    these ops; alone, selects all of them; needed for Conv/ConvTranspose), `all_layers`.
    The BN follows the layer's activation unless `before_activation`. `epsilon`/`momentum`
    default to the `preset` ("keras": 1e-3, 0.99; "torch": 1e-5, 0.9 = 1 - torch's 0.1).
    `training`: the ONNX training-mode form (opset >= 15, upgrading the model when older): BN
    with training_mode=1 whose updated running statistics are graph outputs. `identity`:
    parameters making each BN exactly the identity in inference mode, checked with onnxruntime
    (raises VerificationFailed when not). `axis`: the axis of the layer's output to normalise
    (Keras's `BatchNormalization(axis=...)`; negative counts from the end; default: the
    features, -1 for Dense and 1 for Conv); a BN with one channel gets a note. The report names
    the BNs' trainable tensors and state.
    """
    model, base_dir, _ = model_argument(model, base_dir)
    settings = replace(_settings(preset, epsilon, momentum, gamma, beta, mean, var, identity,
                                 training, before_activation), axis=axis)
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise BadInput(f"opset {opset} is not supported (bnfold needs opset >= {MIN_OPSET})")
    report = InsertReport(epsilon=settings.epsilon, momentum=settings.momentum,
                          training=training, identity=identity, opset=opset)
    candidates = tuple(dict.fromkeys(DENSE_OPS + tuple(ops)))  # Conv only when asked for
    layers = find_layers(model, candidates)
    chosen = _select(layers, after=after, ops=ops, all_layers=all_layers)
    for layer in chosen:
        _check(layer)
    if training and opset < TRAINING_OPSET:
        model = _upgrade(model, opset, base_dir)
        report.upgraded_from, report.opset = opset, TRAINING_OPSET
        names = {layer.name for layer in chosen}
        layers = find_layers(model, candidates)
        chosen = [layer for layer in layers if layer.name in names]
    if identity:
        inexact = sorted({onnx.TensorProto.DataType.Name(layer.dtype) for layer in chosen
                          if not _identity_var(settings.epsilon, layer.dtype)[1]})
        if inexact:
            report.notes.append(
                f"identity: in {', '.join(inexact)} no running variance makes var + epsilon "
                f"exactly 1, so those BNs are the identity only to within rounding")
        inference, _ = _rewrite(model, chosen, replace(settings, training=False))
        exact = {} if inexact else {"atol": 0.0, "rtol": 0.0}  # bit for bit
        report.verification = verify(model, inference, base_dir=base_dir, **exact)
        if not report.verification.passed:
            failure = report.verification.failures[0].describe()
            raise VerificationFailed(f"the inserted identity BatchNormalization changed the "
                                     f"model's outputs: {failure}")
    result, report.insertions = _rewrite(model, chosen, settings)
    report.notes += [f"note: {i.node} has one channel: axis {i.axis} of {i.layer}'s output has "
                     f"size 1, so one mean, variance, scale and shift serve all its values"
                     for i in report.insertions if i.channels == 1]
    return result, report


def _select(layers: list[Layer], *, after=(), ops=(), all_layers: bool = False) -> list[Layer]:
    """The layers chosen by names/globs, ops and `all_layers`, in graph order. A pattern matching
    no layer, or an empty selection, is BadInput naming the candidates."""
    pool = [layer for layer in layers if layer.op in ops] if ops else layers
    if not pool:
        what = "/".join(ops) if ops else "Dense (Gemm or MatMul)"
        raise BadInput(f"no {what} layer in the model; layers: {_names(layers)}")
    if all_layers or (ops and not after):
        return pool
    if not after:
        raise BadInput(f"no layer selected (name one, or use an op or all); layers: {_names(pool)}")
    chosen: set[int] = set()
    for pattern in after:
        hits = _position(pattern, pool)
        hits = hits if hits is not None else [layer for layer in pool if layer.name == pattern]
        hits = hits or [layer for layer in pool if fnmatchcase(layer.name, pattern)]
        if not hits:
            raise BadInput(f"no layer matches '{pattern}'; {_forms(pool)}")
        chosen.update(id(layer) for layer in hits)
    return [layer for layer in pool if id(layer) in chosen]


# -- checks ---------------------------------------------------------------------------------

def _settings(preset, epsilon, momentum, gamma, beta, mean, var, identity, training,
              before_activation) -> _Settings:
    if preset not in PRESETS:
        raise BadInput(f"unknown preset '{preset}': choose from {', '.join(PRESETS)}")
    default_eps, default_momentum = PRESETS[preset]
    eps = default_eps if epsilon is None else float(epsilon)
    m = default_momentum if momentum is None else float(momentum)
    if not (math.isfinite(eps) and eps > 0):
        raise BadInput(f"epsilon must be a positive number, got {eps:g}")
    if not (math.isfinite(m) and 0.0 <= m <= 1.0):
        raise BadInput(f"momentum must be between 0 and 1 (ONNX convention), got {m:g}")
    if identity and (gamma, beta, mean, var) != (1.0, 0.0, 0.0, 1.0):
        raise BadInput("identity chooses gamma, beta, mean and var itself: give none of them")
    for name, value in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var)):
        if not math.isfinite(value):
            raise BadInput(f"{name} must be finite, got {value:g}")
    if var < 0:
        raise BadInput(f"var must be >= 0, got {var:g}")
    return _Settings(eps, m, float(gamma), float(beta), float(mean), float(var), identity,
                     training, before_activation)


def _check(layer: Layer) -> None:
    where = f"layer {layer.name} ({layer.op})"
    if layer.out_features is None:
        raise BadInput(f"{where}: its feature count cannot be determined (weight shape unknown)")
    if layer.rank is None:
        raise BadInput(f"{where}: the rank of its output cannot be determined "
                       f"(shape inference gave no shape for '{layer.output}')")
    if layer.rank < 2:
        raise BadInput(f"{where}: its output has rank {layer.rank}; BatchNormalization needs a "
                       f"batch axis and a feature axis")
    if layer.dtype not in FLOAT_TYPES:
        kind = onnx.TensorProto.DataType.Name(layer.dtype) if layer.dtype else "unknown"
        raise BadInput(f"{where}: element type {kind} cannot be batch-normalized")


def _position(pattern: str, pool: list[Layer]) -> list[Layer] | None:
    """'#N': the N-th layer in graph order, counting from 1 (as `inspect` numbers them); None
    when `pattern` is not of that form (a layer may be named '#2': its name wins)."""
    match = re.fullmatch(r"#([0-9]+)", pattern)
    if match is None or any(layer.name == pattern for layer in pool):
        return None
    n = int(match[1])
    return [pool[n - 1]] if 1 <= n <= len(pool) else []


def _forms(pool: list[Layer]) -> str:
    """The layers and the forms that select them, for an error."""
    names = [layer.name for layer in pool]
    common = os.path.commonprefix(names)
    glob = f"a glob ('{common}*'), " if common and len(names) > 1 else "a glob, "
    last = f" to '#{len(pool)}'" if len(pool) > 1 else ""
    return (f"layers: {_names(pool)} (select by name, {glob}or position in graph order: "
            f"'#1'{last}, as `bnfold inspect` numbers them)")


def _names(layers: list[Layer]) -> str:
    names = [layer.name for layer in layers]
    if not names:
        return "none"
    more = len(names) - _MAX_LISTED
    return ", ".join(names[:_MAX_LISTED]) + (f", ... ({more} more)" if more > 0 else "")


# -- opset upgrade and identity variance -------------------------------------------------------

def _upgrade(model: onnx.ModelProto, opset: int, base_dir: str | None) -> onnx.ModelProto:
    """The model at opset 15, checked equivalent to `model` with onnxruntime."""
    why = f"training mode needs opset >= {TRAINING_OPSET}; converting opset {opset}"
    try:
        upgraded = onnx.version_converter.convert_version(model, TRAINING_OPSET)
    except Exception as err:  # the converter raises several types, none of them ours
        raise BadInput(f"{why} failed: {one_line(err)}") from None
    check = verify(model, upgraded, base_dir=base_dir)
    if not check.passed:
        raise BadInput(f"{why} changed the outputs: {check.failures[0].describe()}")
    return upgraded


def _identity_var(epsilon: float, dtype: int) -> tuple[float, bool]:
    """A running variance v with v + eps == 1 exactly, and whether one exists.

    With mean 0, gamma 1, beta 0 the BN is then y = x / sqrt(1) = x. The sum is taken as
    onnxruntime takes it: in float32 (float64 for double models), eps being a float32 attribute.
    """
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    compute = np.float64 if np_type == np.float64 else np.float32
    eps = compute(np.float32(epsilon))
    nearest = np.array(1.0 - float(eps), dtype=np_type)
    candidates, up, down = [nearest], nearest, nearest
    for _ in range(4):  # a few ulps either side of 1 - eps
        up = np.nextafter(up, np.array(2, dtype=np_type))
        down = np.nextafter(down, np.array(0, dtype=np_type))
        candidates += [up, down]
    for candidate in candidates:
        if compute(candidate) + eps == compute(1):
            return float(candidate), True
    return float(nearest), False


# -- rewrite --------------------------------------------------------------------------------

def _rewrite(model: onnx.ModelProto, layers: list[Layer], settings: _Settings
             ) -> tuple[onnx.ModelProto, list[Insertion]]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    names = NameAllocator(out)
    producer_index = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    graph_outputs = {o.name for o in graph.output}
    chains: dict[int, list[onnx.NodeProto]] = {}
    renames: dict[str, str] = {}  # a layer's output -> its BN's, for every other reader
    insertions = []
    filled: dict[tuple, onnx.TensorProto | None] = {}  # parameter tensors, made once (_filled)
    shapes = infer_shapes(out)[0] if settings.axis is not None else {}
    for layer in layers:
        use_activation = layer.activation is not None and not settings.before_activation
        anchor = layer.activation.output[0] if use_activation else layer.output
        index = producer_index[anchor]
        insertion = Insertion(layer=layer.name, op=layer.op, features=layer.out_features,
                              follows=layer.activation_op if use_activation else "layer",
                              input=anchor, output="", node="", params={})
        insertion.axis, insertion.channels = _bn_axis(layer, settings.axis, shapes)
        if layer.batchnorm:
            insertion.note = f"{layer.batchnorm} already follows it"
        if anchor in graph_outputs:  # the BN's result takes the graph output's name
            insertion.input = names(f"{layer.name}/bn.input")
            producer = graph.node[index]
            producer.output[list(producer.output).index(anchor)] = insertion.input
            chains[index] = _chain(layer, insertion.input, anchor, insertion, names, settings, out,
                                   filled)
        else:
            chains[index] = _chain(layer, anchor, None, insertion, names, settings, out, filled)
            renames[anchor] = chains[index][-1].output[0]
        insertion.output = chains[index][-1].output[0]
        insertions.append(insertion)
    rename_all(graph, renames)  # (the new nodes are not in the graph yet)
    ordered = []
    for i, node in enumerate(graph.node):
        ordered.append(node)
        ordered += chains.get(i, [])
    del graph.node[:]
    graph.node.extend(ordered)
    return out, insertions


def _bn_axis(layer: Layer, axis: int | None, shapes: dict) -> tuple[int, int]:
    """The axis of the layer's output the BN normalises (non-negative) and its size."""
    feature_axis = layer.rank - 1 if layer.channel_last else 1
    if axis is None:
        return feature_axis, layer.out_features
    where = f"--axis {axis}: layer {layer.name}'s output has rank {layer.rank}"
    if not -layer.rank <= axis < layer.rank:
        raise BadInput(f"{where}; choose an axis from 1 to {layer.rank - 1} (or negative)")
    index = axis % layer.rank
    if index == 0:
        raise BadInput(f"{where}; axis 0 is the batch axis, which batch norm averages over")
    if index == feature_axis:
        return index, layer.out_features
    shape = shapes.get(layer.output)
    size = shape[index] if shape is not None and len(shape) == layer.rank else None
    if not isinstance(size, int):
        raise BadInput(f"{where}; the size of axis {index} is not known (a fixed size is "
                       f"needed: it is the BN's channel count)")
    return index, size


def _filled(value: float, dtype: int, features: int,
            made: dict[tuple, onnx.TensorProto | None]) -> onnx.TensorProto | None:
    """An unnamed [features] tensor of `value` in element type `dtype`, to copy; None when
    `value` overflows the type. `made` keeps them for one insert (its layers of one width share
    each), known by the value's type and repr, not by equality, which would take -0.0 for 0.0."""
    key = (type(value), repr(value), dtype, features)
    if key not in made:
        with np.errstate(over="ignore"):
            array = np.full(features, value, dtype=helper.tensor_dtype_to_np_dtype(dtype))
        finite = np.all(np.isfinite(array.astype(np.float64)))
        made[key] = numpy_helper.from_array(array) if finite else None
    return made[key]


def _chain(layer: Layer, x: str, y: str | None, insertion: Insertion, names: NameAllocator,
           settings: _Settings, model: onnx.ModelProto,
           filled: dict[tuple, onnx.TensorProto | None]) -> list[onnx.NodeProto]:
    """The nodes computing y = BN(x) on the layer's feature axis (y None: a fresh name); adds
    their initializers (and the running-statistics outputs) to the graph, fills `insertion`."""
    graph, base = model.graph, layer.name
    features, dtype = insertion.channels, layer.dtype
    var = _identity_var(settings.epsilon, dtype)[0] if settings.identity else settings.var
    values = {"gamma": settings.gamma, "beta": settings.beta, "mean": settings.mean, "var": var}
    for key, value in values.items():
        name = insertion.params[key] = names(f"{base}/bn.{key}")
        vector = _filled(value, dtype, features, filled)
        if vector is None:
            np_type = helper.tensor_dtype_to_np_dtype(dtype)
            raise BadInput(f"{key} {value:g} overflows {np.dtype(np_type).name} (layer {base})")
        tensor = graph.initializer.add()
        tensor.CopyFrom(vector)
        tensor.name = name
        if model.ir_version < 4:  # IR < 4: every initializer is listed as a graph input too
            graph.input.append(helper.make_tensor_value_info(name, dtype, [features]))

    attributes: dict[str, Any] = {"epsilon": settings.epsilon, "momentum": settings.momentum}
    if default_opset(model) < 9:
        attributes["spatial"] = 1  # per-channel statistics (spatial=0 is per activation)
    if settings.training:
        attributes["training_mode"] = 1
        insertion.running_outputs = [names(f"{base}/bn.running_mean"),
                                     names(f"{base}/bn.running_var")]
        graph.output.extend(helper.make_tensor_value_info(n, dtype, [features])
                            for n in insertion.running_outputs)
    if insertion.axis != 1:  # ONNX BN normalises axis 1: move the axis there and back
        insertion.transpose = [0, insertion.axis] + [i for i in range(1, layer.rank)
                                                     if i != insertion.axis]

    insertion.node = bn_name = names(f"{base}/BatchNormalization")
    nodes = []
    bn_input = x
    if insertion.transpose is not None:
        to_channels = names(f"{base}/bn.to_channels")
        bn_input = names(f"{to_channels}_output_0")
        nodes.append(helper.make_node("Transpose", [x], [bn_input], name=to_channels,
                                      perm=insertion.transpose))
    last = insertion.transpose is None
    bn_output = y if (y is not None and last) else names(f"{bn_name}_output_0")
    inputs = [bn_input] + [insertion.params[k] for k in ("gamma", "beta", "mean", "var")]
    nodes.append(helper.make_node("BatchNormalization", inputs,
                                  [bn_output] + insertion.running_outputs, name=bn_name,
                                  **attributes))
    if not last:
        from_channels = names(f"{base}/bn.from_channels")
        inverse = [int(i) for i in np.argsort(insertion.transpose)]
        nodes.append(helper.make_node("Transpose", [bn_output],
                                      [y or names(f"{from_channels}_output_0")],
                                      name=from_channels, perm=inverse))
    return nodes
