"""onnxruntime-training's artifacts for a model with batch norms, so that it trains, then folds.

    bnfold insert -> bnfold artifacts -> onnxruntime.training.api: train, export -> bnfold fold

Each BatchNormalization's running mean and variance are frozen state that the trainer updates in
place, as ONNX defines it (running = running * momentum + batch * (1 - momentum)); its scale and
shift and the layers' weights and biases on the loss's path are trainable. The loss reads the
logits: the input of a final Softmax/LogSoftmax (cross-entropy) or Sigmoid (bce), else the output.
onnxruntime-training 1.19 (its last release) reads IR <= 10 and opset <= 21: the trainer's copy of
the model is capped to those. It replaces onnxruntime, so it is imported by `_trainer` alone.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import onnx
from onnx import helper

from bnfold.affine import training_reason
from bnfold.errors import BadInput, one_line
from bnfold.fold import to_inference_mode
from bnfold.graph import FLOAT_TYPES, NameAllocator, default_opset, infer_shapes, remove_where
from bnfold.nodes import attr, display_name
from bnfold.wire import read_external_data

TRAINER_IR_VERSION = 10  # the newest IR onnxruntime-training 1.19 reads
TRAINER_OPSET = 21  # the newest opset it runs
TRAINER_INSTALL = ("pip install onnxruntime-training-cpu==1.19.2 onnx==1.17.0 torch==2.13.0 "
                   "numpy click ml_dtypes")

LOSSES = {"cross-entropy": "CrossEntropyLoss", "mse": "MSELoss", "bce": "BCEWithLogitsLoss"}
OPTIMIZERS = {"adamw": "AdamW", "sgd": "SGD"}
FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")

# The activation a loss computes itself, so that it reads that activation's input (the logits).
_FINAL = {"cross-entropy": ("Softmax", "LogSoftmax"), "bce": ("Sigmoid",)}
# Linear layers and the positions of their weight and bias.
_LAYER_PARAMS = {"Gemm": (1, 2), "Conv": (1, 2), "ConvTranspose": (1, 2), "MatMul": (0, 1)}
_MAX_LISTED = 12  # names per line in the text report


@dataclass
class TensorSpec:
    name: str
    dtype: str  # "int64", "float32", ...
    shape: list  # ints, symbolic names, None for unknown

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"


@dataclass
class ArtifactsReport:
    """What the trainer gets (``training_plan``) and what was written (``training_artifacts``)."""

    loss: str
    optimizer: str = "adamw"
    logits: str = ""  # the tensor the loss reads
    logits_from: str = ""  # how it was chosen
    target: TensorSpec | None = None  # the input the loss adds: labels or target values
    inputs: list[str] = field(default_factory=list)  # what the training step takes, in order
    outputs: list[str] = field(default_factory=list)  # to export the trained model with
    trainable: list[str] = field(default_factory=list)
    state: list[str] = field(default_factory=list)  # BN running statistics: frozen, updated
    frozen: list[str] = field(default_factory=list)  # --freeze matches
    constants: list[str] = field(default_factory=list)  # other float initializers, untouched
    ir_version: list[int] | None = None  # [from, to] when capped for the trainer
    opset: list[int] | None = None  # [from, to] when converted for the trainer
    dropped_outputs: list[str] = field(default_factory=list)  # statistics of training-mode BN
    directory: str | None = None
    files: list[str] = field(default_factory=list)
    loss_output: str | None = None  # the training model's loss output
    trainer_log: list[str] = field(default_factory=list)  # its warnings and errors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        where = f" in {self.directory}" if self.directory else ""
        lines = [f"training artifacts{where} ({self.loss} loss, {self.optimizer}): "
                 f"{', '.join(self.files) or 'none written'}",
                 f"  loss on {self.logits} ({self.logits_from}); {self.target.describe()}",
                 f"  training step: module({', '.join(self.inputs)})",
                 f"  trainable: {_listed(self.trainable)}",
                 f"  state (frozen, the trainer updates it): {_listed(self.state)}"]
        if self.frozen:
            lines.append(f"  frozen (--freeze): {_listed(self.frozen)}")
        if self.constants:
            lines.append(f"  constants (not trained): {_listed(self.constants)}")
        if self.dropped_outputs:
            lines.append(f"  training-mode BN set to inference mode; dropped outputs "
                         f"{', '.join(self.dropped_outputs)}")
        if self.ir_version:
            old, new = self.ir_version
            why = ("the newest onnxruntime-training reads" if new < old else
                   "initializers no longer listed as inputs")
            lines.append(f"  IR version {old} -> {new} ({why})")
        if self.opset:
            lines.append(f"  opset {self.opset[0]} -> {self.opset[1]} (onnx.version_converter; "
                         f"the newest onnxruntime-training runs)")
        lines += [f"  onnxruntime: {line}" for line in self.trainer_log]
        outputs = ", ".join(repr(o) for o in self.outputs)
        lines.append(f"after training: module.export_model_for_inferencing(PATH, [{outputs}]), "
                     f"then bnfold fold PATH")
        return "\n".join(lines)


def training_artifacts(model: onnx.ModelProto, directory: str | os.PathLike, *, loss: str,
                       optimizer: str = "adamw", logits: str | None = None, freeze=(),
                       force: bool = False, base_dir: str | None = None) -> ArtifactsReport:
    """Write onnxruntime-training's training, eval and optimizer models and checkpoint for
    `model` into `directory` (see `training_plan` for what trains); never mutates `model`.

    `directory` is created (its parent must exist); one that is not empty is refused unless
    `force`, which replaces the four artifacts in it one by one and leaves its other files.
    The artifacts are generated in a temporary directory beside it first, so a failure writes
    nothing. Raises BadInput when onnxruntime-training is not installed.
    """
    directory = os.path.abspath(os.fspath(directory))
    if optimizer not in OPTIMIZERS:
        raise BadInput(f"unknown optimizer '{optimizer}': choose from {', '.join(OPTIMIZERS)}")
    trainer = _trainer()
    _check_directory(directory, force)
    base, report = training_plan(model, loss=loss, logits=logits, freeze=freeze,
                                 base_dir=base_dir)
    report.optimizer, report.directory = optimizer, directory
    stage = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=".bnfold-")
    try:
        report.loss_output = _generate(trainer, base, report, stage)
        report.files = [name for name in FILES if os.path.exists(os.path.join(stage, name))]
        _commit(stage, directory)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


def training_plan(model: onnx.ModelProto, *, loss: str, logits: str | None = None, freeze=(),
                  base_dir: str | None = None) -> tuple[onnx.ModelProto, ArtifactsReport]:
    """The model as onnxruntime-training's `generate_artifacts` gets it, and what will train.

    Training-mode BNs are set to inference mode (their statistics outputs dropped); the logits
    become a graph output; IR and opset are capped to what the trainer reads. Trainable: the
    scale and shift of every BN and the weight and bias of every Gemm, MatMul, Conv,
    ConvTranspose (and bias Add after one) on the loss's path, less the `freeze` globs (fnmatch
    over tensor names); state: every BN's running mean and variance. Needs no trainer.
    """
    if loss not in LOSSES:
        raise BadInput(f"unknown loss '{loss}': choose from {', '.join(LOSSES)}")
    base = to_inference_mode(model)
    report = ArtifactsReport(loss=loss)
    kept = {o.name for o in base.graph.output}
    report.dropped_outputs = [o.name for o in model.graph.output if o.name not in kept]
    read_external_data(base, base_dir or "")
    for node in base.graph.node:
        if node.op_type == "BatchNormalization" and training_reason(node, default_opset(base)):
            raise BadInput(f"{display_name(node)}: in training mode, and a node reads its "
                           f"running statistics; the trainer needs inference-mode BN")
    _cap_versions(base, report)
    graph = base.graph  # (a converted opset is a new graph)
    # The trainer lists the parameters as inputs itself: a second listing (IR < 4 models, torch's
    # keep_initializers_as_inputs) is a duplicate definition to it.
    initializers = {t.name for t in graph.initializer}
    remove_where(graph.input, lambda i: i.name in initializers)
    report.outputs = [o.name for o in graph.output]
    report.logits, report.logits_from = _loss_input(base, loss, logits)
    report.trainable, report.state, report.constants = _parameters(base, report.logits)
    report.frozen = _freeze(report, freeze)
    report.target, logits_info = _target(base, loss, report.logits)
    report.inputs = [i.name for i in graph.input if i.name not in initializers]
    report.inputs.append(report.target.name)
    if report.logits not in kept:  # the loss blocks read the logits as a graph output
        graph.output.append(logits_info)
    try:
        onnx.checker.check_model(base)
    except onnx.checker.ValidationError as err:
        raise BadInput(f"the model for the trainer fails onnx.checker: {one_line(err)}") from None
    return base, report


# -- the plan -------------------------------------------------------------------------------

def _loss_input(model: onnx.ModelProto, loss: str, logits: str | None) -> tuple[str, str]:
    graph = model.graph
    producer = {o: node for node in graph.node for o in node.output if o}
    if logits is not None:
        if logits not in producer:
            raise BadInput(f"--logits {logits}: no node of the main graph computes it")
        return logits, "--logits"
    outputs = [o.name for o in graph.output]
    if len(outputs) != 1:
        raise BadInput(f"the model has {len(outputs)} outputs ({', '.join(outputs)}): name the "
                       f"tensor the loss reads with --logits")
    (y,) = outputs
    node = producer.get(y)
    if loss in _FINAL and node is not None and node.op_type in _FINAL[loss]:
        default_axis = -1 if default_opset(model) >= 13 else 1
        if node.op_type != "Sigmoid" and attr(node, "axis", default_axis) in (0, -2):
            raise BadInput(f"{node.op_type} '{display_name(node)}' normalises axis 0, not the "
                           f"classes of [batch, classes]: name the logits with --logits")
        return node.input[0], f"the input of {node.op_type} '{display_name(node)}', the last node"
    for other, ops in _FINAL.items():  # (mse reads any output as it is)
        if loss in _FINAL and other != loss and node is not None and node.op_type in ops:
            raise BadInput(f"the model ends in {node.op_type} ('{display_name(node)}'): use "
                           f"--loss {other}, or name the tensor the loss reads with --logits")
    return y, "the model's output"


def _parameters(model: onnx.ModelProto, logits: str) -> tuple[list[str], list[str], list[str]]:
    """(trainable, state, constants): the parameters on the path to `logits`, by role."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producer = {o: node for node in graph.node for o in node.output if o}

    def source(name: str) -> str | None:  # the initializer `name` is, through Casts (Keras)
        while name in producer and producer[name].op_type == "Cast":
            name = producer[name].input[0]
        return name if name in initializers else None

    upstream, stack = set(), [logits]  # every node the logits depend on
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in upstream:
            upstream.add(id(node))
            stack.extend(node.input)
    trainable, state = [], []
    for node in graph.node:
        if id(node) not in upstream or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "BatchNormalization":
            trainable += [source(n) for n in node.input[1:3]]
            for role, name in zip(("mean", "variance"), node.input[3:5]):
                if name not in initializers:
                    raise BadInput(f"{display_name(node)}: its running {role} '{name}' is not "
                                   f"an initializer, so the trainer cannot update it")
                state.append(name)
        elif node.op_type in _LAYER_PARAMS:
            trainable += [source(node.input[i]) for i in _LAYER_PARAMS[node.op_type]
                          if i < len(node.input)]
        elif node.op_type == "Add" and any(_follows_layer(producer, n) for n in node.input):
            trainable += [source(n) for n in node.input]  # the bias Add of a MatMul
    trainable = [n for n in dict.fromkeys(trainable) if n and n not in state]
    chosen = set(trainable) | set(state)
    constants = [t.name for t in graph.initializer
                 if t.name not in chosen and t.data_type in FLOAT_TYPES]
    if not trainable:
        raise BadInput(f"no trainable tensor on the path to {logits}: no BN scale or shift, "
                       f"no weight of a Gemm, MatMul, Conv or ConvTranspose in initializers")
    return trainable, list(dict.fromkeys(state)), constants


def _follows_layer(producer: dict, name: str) -> bool:
    node = producer.get(name)
    while node is not None and node.op_type == "Cast":
        node = producer.get(node.input[0])
    return node is not None and node.op_type in _LAYER_PARAMS


def _freeze(report: ArtifactsReport, patterns) -> list[str]:
    frozen: set[str] = set()
    for pattern in patterns:
        hits = {n for n in report.trainable + report.state if fnmatchcase(n, pattern)}
        if not hits:
            raise BadInput(f"--freeze {pattern}: matches no trainable tensor; trainable: "
                           f"{_listed(report.trainable)}")
        frozen |= hits - set(report.state)
    report.trainable = [n for n in report.trainable if n not in frozen]
    if not report.trainable:
        raise BadInput("--freeze froze every trainable tensor: nothing left to train")
    return sorted(frozen)


def _target(model: onnx.ModelProto, loss: str, logits: str
            ) -> tuple[TensorSpec, onnx.ValueInfoProto]:
    """The input the loss adds (class indices for cross-entropy, values like the logits else),
    and the logits' type as a graph output."""
    shapes, types = infer_shapes(model)
    shape, elem = shapes.get(logits), types.get(logits)
    if shape is None or elem is None:
        raise BadInput(f"the shape of {logits}, which the loss reads, cannot be inferred")
    info = helper.make_tensor_value_info(logits, elem, list(shape))
    name = NameAllocator(model)("labels" if loss == "cross-entropy" else "target")
    if loss != "cross-entropy":
        return TensorSpec(name, _dtype_name(elem), list(shape)), info
    # onnxruntime's loss takes the classes on axis 1 and builds its labels input by dropping the
    # last axis: only [batch, classes] logits satisfy both.
    if len(shape) != 2:
        raise BadInput(f"cross-entropy needs logits [batch, classes]; {logits} has rank "
                       f"{len(shape)}")
    return TensorSpec(name, "int64", [shape[0]]), info


def _dtype_name(elem: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem).name


def _cap_versions(model: onnx.ModelProto, report: ArtifactsReport) -> None:
    opset = default_opset(model)
    if opset > TRAINER_OPSET:
        try:
            converted = onnx.version_converter.convert_version(model, TRAINER_OPSET)
        except Exception as err:  # the converter raises several types, none of them ours
            raise BadInput(f"opset {opset} is newer than onnxruntime-training runs "
                           f"({TRAINER_OPSET}), and converting it failed: "
                           f"{one_line(err)}") from None
        model.CopyFrom(converted)
        report.opset = [opset, TRAINER_OPSET]
    capped = min(max(model.ir_version, 4), TRAINER_IR_VERSION)  # IR 4: initializers unlisted
    if model.ir_version != capped:
        report.ir_version = [model.ir_version, capped]
        model.ir_version = capped


def _listed(names: list[str]) -> str:
    if not names:
        return "none"
    more = len(names) - _MAX_LISTED
    return ", ".join(names[:_MAX_LISTED]) + (f", ... ({more} more)" if more > 0 else "")


# -- the trainer ----------------------------------------------------------------------------

def _trainer():
    """onnxruntime-training's `artifacts` module, or BadInput saying how to install it."""
    try:
        from onnxruntime.training import artifacts
    except ImportError as err:
        if getattr(err, "name", None) in ("onnxruntime.training", "onnxruntime"):
            raise BadInput(f"bnfold artifacts needs onnxruntime-training, which replaces "
                           f"onnxruntime: in a new virtual environment, {TRAINER_INSTALL}, then "
                           f"pip install --no-deps bnfold") from None
        raise BadInput(f"onnxruntime-training is installed but cannot be imported "
                       f"({one_line(err)}); it needs: {TRAINER_INSTALL}") from None
    return artifacts


def _generate(trainer, base: onnx.ModelProto, report: ArtifactsReport, directory: str) -> str:
    """Run `generate_artifacts` into `directory`; the training model's loss output name."""
    from onnxruntime.training import onnxblock

    block = getattr(onnxblock.loss, LOSSES[report.loss])()

    class Loss(onnxblock.Block):  # the library's loss, with the target input named as planned
        def build(self, logits: str) -> str:
            return block(logits, report.target.name)

    try:
        with _trainer_log(report.trainer_log):
            trainer.generate_artifacts(
                base, requires_grad=report.trainable, frozen_params=report.state + report.frozen,
                loss=Loss(), optimizer=getattr(trainer.OptimType, OPTIMIZERS[report.optimizer]),
                artifact_directory=directory, loss_input_names=[report.logits])
    except Exception as err:  # onnxruntime raises RuntimeError and its own types
        raise BadInput(f"onnxruntime-training cannot build the training model: "
                       f"{_ort_message(err)}") from None
    training = onnx.load(os.path.join(directory, "training_model.onnx"), load_external_data=False)
    return training.graph.output[0].name


@contextmanager
def _trainer_log(kept: list[str]):
    """Catch what onnxruntime's C++ code logs on file descriptor 2 while building the graphs
    (a line per graph transformer and pass, whatever the log severity is set to); keep its
    warnings and errors in `kept`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines = log.read().decode(errors="replace").splitlines()
            kept += [line for line in lines if not re.search(r"\[[IV]:onnxruntime", line)]


def _ort_message(err: BaseException) -> str:
    """onnxruntime's message without the source location, function and status code before it."""
    text = re.sub(r"^.*\[ONNXRuntimeError\] : \d+ : \w+ : ", "", one_line(err))
    return re.sub(r"^/onnxruntime_src/.* was false\. ", "", text)


# -- the directory --------------------------------------------------------------------------

def _check_directory(directory: str, force: bool) -> None:
    parent = os.path.dirname(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise BadInput(f"{directory}: exists and is not a directory")
    if not os.path.isdir(parent):
        raise BadInput(f"{directory}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{directory}: directory {parent} is not writable")
    if os.path.isdir(directory) and os.listdir(directory) and not force:
        raise BadInput(f"{directory}: not empty (--force replaces the artifacts in it)")


def _commit(stage: str, directory: str) -> None:
    """Move the artifacts into place: the whole directory in one rename when it is new."""
    if not os.path.exists(directory):
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp's is private to the owner
        os.rename(stage, directory)
        return
    for name in os.listdir(stage):
        os.replace(os.path.join(stage, name), os.path.join(directory, name))
