"""End to end on real exports: torch modules exported here by both exporters (eval and training
mode), and the committed models in models/, folded and compared with the framework's own output.

The reference is always the framework (torch's eval forward, Keras's ``model.predict`` stored in
the .npz), never the unfolded ONNX model alone: an exporter bug and a folding bug must not cancel.
Tolerance: fp32, atol 1e-5 / rtol 1e-4 (onnxruntime's own op tests); folding only reorders
rounding, and these models' outputs are of order 1-10.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bnfold.fold import fold, to_inference_mode
from torch_models import EXPORTERS, RAW_EXPORTERS, export, torch_eval

ATOL, RTOL = 1e-5, 1e-4
BATCH = 7  # differs from every channel count below; batch 1 would make training-mode BN degenerate
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


# --------------------------------------------------------------------------- helpers


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime without graph optimizations, so that it fuses no Conv+BN of its own."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    error = np.abs(actual - expected)
    bad = error > ATOL + RTOL * np.abs(expected)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.size} values differ; max abs {error.max():.3g}, "
        f"max rel {(error / np.maximum(np.abs(expected), 1e-30)).max():.3g}"
    )


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def interface(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(v.name, str(v.type)) for v in [*model.graph.input, *model.graph.output]]


def check_folded(original: onnx.ModelProto, folded: onnx.ModelProto, added=()) -> None:
    """The result is valid ONNX, keeps the interface, and changed nothing but batch norms (and
    the nodes `added`: the bias Add of a MatMul that had none)."""
    onnx.checker.check_model(folded, full_check=True)
    assert interface(folded) == interface(original)
    less = collections.Counter(added)
    others = lambda m: {k: v - less[k] if m is folded else v for k, v in op_counts(m).items()
                        if k != "BatchNormalization"}
    # Nodes that computed a constant the fold replaced (raw dynamo exports compute a missing Conv
    # bias from Shape/Expand/CastLike) go with it; every other op stays.
    computing = {"Constant", "Shape", "Expand", "CastLike", "Cast", "Identity", "Concat",
                 "Reshape", "Unsqueeze", "Squeeze", "Gather", "Slice", "Transpose"}
    kept, before = others(folded), others(original)
    assert all(kept.get(op, 0) == n or (op in computing and kept.get(op, 0) < n)
               for op, n in before.items()), (kept, before)
    assert set(kept) <= set(before)


# --------------------------------------------------------------------------- torch modules


def trained_looking(module: nn.Module, seed: int) -> nn.Module:
    """Batch norms far from the identity (an identity-like BN passes even when folding is wrong)."""
    generator = torch.Generator().manual_seed(seed)
    uniform = lambda t, lo, hi: t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=generator))
    with torch.no_grad():
        for p in module.parameters():  # weights too, so no two tensors are equal by accident
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                uniform(bn.weight, 0.5, 1.5)
                uniform(bn.bias, -0.5, 0.5)
                uniform(bn.running_mean, -1.0, 1.0)
                uniform(bn.running_var, 0.3, 3.0)
    return module.eval()


class TokenLinearBN(nn.Module):
    """LeViT's Linear + BatchNorm1d over flattened tokens: [B, N, C] -> [B*N, C] -> BN -> back."""

    def __init__(self, a: int, b: int, bias: bool = False):
        super().__init__()
        self.linear, self.bn = nn.Linear(a, b, bias=bias), nn.BatchNorm1d(b)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = TokenLinearBN(8, 16), TokenLinearBN(16, 12, bias=True)

    def forward(self, x):
        return self.second(nn.functional.hardswish(self.first(x)))


@dataclass
class Case:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # without the batch axis
    # One entry per BN that must stay: the substrings, any of which its reason must contain.
    kept: list[tuple[str, ...]] = field(default_factory=list)
    kept_raw: list[tuple[str, ...]] | None = None  # the same for the raw exports, where different
    added: dict[str, int] = field(default_factory=dict)  # nodes the folds add


CASES = {
    # Conv-BN-ReLU, a grouped strided Conv-BN, and Linear-BN (Gemm): all fold backward.
    "conv_bn_relu": Case(lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 10),
    ), (3, 12, 12)),
    # The seed's ordering, Dense -> ReLU -> BN -> Dense: folds forward into the last Gemm.
    "seed_mlp": Case(lambda: nn.Sequential(
        nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(),
        nn.BatchNorm1d(32), nn.Linear(32, 2),
    ), (5,)),
    # Depthwise Conv1d without bias, a 3-D conv, and a grouped ConvTranspose (weight [C_in, M/g, k]).
    "conv_variants": Case(lambda: nn.Sequential(
        nn.Conv1d(4, 4, 3, groups=4, bias=False), nn.BatchNorm1d(4), nn.ReLU(),
        nn.Unflatten(2, (2, 5)), nn.Unflatten(3, (1, 5)),  # [N, 4, 10] -> [N, 4, 2, 1, 5]
        nn.Conv3d(4, 6, (1, 1, 3)), nn.BatchNorm3d(6), nn.ReLU(),
        nn.Flatten(2, 3),  # [N, 6, 2, 3]
        nn.ConvTranspose2d(6, 10, 3, stride=2, groups=2), nn.BatchNorm2d(10),
    ), (4, 12)),
    # BN after a ReLU, before a padded Conv: no way back through the ReLU, and a forward fold would
    # give the padded border a shift it never had.
    "bn_before_padded_conv": Case(lambda: nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, padding=1),
    ), (3, 9, 9), kept=[("padding",)]),
    # Linear on [N, T, F] exports as MatMul(+Add) whose features are the last axis; BatchNorm1d(T)
    # normalises axis 1, the sequence: not a per-output-channel scale, in neither direction.
    # The raw exports (no constant folding) write the weights as Transpose(W): there the first
    # reason found may be that the weight is not a constant.
    "linear_rank3_bn_on_time": Case(lambda: nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(6), nn.Linear(8, 3),
    ), (6, 5), kept=[("feature axis",)], kept_raw=[("feature axis", "not constant")]),
    # LeViT's token BN: the Reshape/Flatten only merges leading axes, so C stays the feature axis
    # and both BNs fold into their MatMul (the one without bias gets a bias Add before the Reshape).
    "levit_token_bn": Case(TokenMLP, (6, 8), added={"Add": 1}),
}


def batch_norm_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def make_case(name: str) -> tuple[nn.Module, np.ndarray]:
    case = CASES[name]
    module = trained_looking(case.build(), seed=sum(map(ord, name)))
    x = np.random.default_rng(0).normal(0.3, 1.2, size=(BATCH, *case.input_shape)).astype(np.float32)
    return module, x


# --------------------------------------------------------------------------- eval-mode exports


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("name", list(CASES))
def test_eval_export_folds_every_foldable_bn(name, exporter, tmp_path):
    module, x = make_case(name)
    expected = torch_eval(module, x)
    model = export(module, x[:4], tmp_path / "model.onnx", exporter)  # another batch size than the one checked
    kept = CASES[name].kept
    bn_before = op_counts(model)["BatchNormalization"]
    if exporter in RAW_EXPORTERS:
        assert bn_before == batch_norm_count(module), "the raw export should keep every BN"
        kept = CASES[name].kept_raw or kept

    folded, report = fold(model)

    check_folded(model, folded, CASES[name].added)
    assert op_counts(folded)["BatchNormalization"] == len(kept)
    assert len(report.folded) == bn_before - len(kept)
    assert len(report.kept) == len(kept)
    for decision, reasons in zip(report.kept, kept):
        assert any(r in decision.reason for r in reasons), decision.reason
    (y,) = run(folded, {"x": x})
    assert_close(y, expected, f"{name} ({exporter}) folded vs torch eval")


# --------------------------------------------------------------------------- training-mode exports

TRAINING_CASES = ["conv_bn_relu", "seed_mlp", "conv_variants"]


def training_export(name: str, tmp_path: Path) -> tuple[nn.Module, np.ndarray, onnx.ModelProto]:
    """TorchScript export in training mode: BN-14+ nodes with training_mode=1 and three outputs.

    The exporter runs the module once in train mode, which updates its running statistics; the
    file holds the updated ones, so torch's eval reference is taken after the export.
    """
    module, x = make_case(name)
    model = export(module.train(), x[:4], tmp_path / "train.onnx", "torchscript", training=True)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == batch_norm_count(module)
    assert all(onnx.helper.get_node_attr_value(n, "training_mode") == 1 for n in bns)
    return module, x, model


@pytest.mark.parametrize("name", TRAINING_CASES)
def test_training_export_is_kept_by_default(name, tmp_path):
    module, x, model = training_export(name, tmp_path)

    folded, report = fold(model)

    onnx.checker.check_model(folded, full_check=True)
    assert op_counts(folded) == op_counts(model)
    assert not report.folded
    assert len(report.kept) == batch_norm_count(module)
    assert all("training mode" in d.reason for d in report.kept)
    # Still the training-mode computation (batch statistics), unchanged.
    assert_close(run(folded, {"x": x})[0], run(model, {"x": x})[0], f"{name} kept vs original")


@pytest.mark.parametrize("name", TRAINING_CASES)
def test_training_export_folds_when_converted_to_inference(name, tmp_path):
    module, x, model = training_export(name, tmp_path)
    expected = torch_eval(module, x)

    # The reference that verification uses for this option must be torch's eval model.
    assert_close(run(to_inference_mode(model), {"x": x})[0], expected, f"{name} to_inference_mode")

    folded, report = fold(model, training_to_inference=True)

    onnx.checker.check_model(folded, full_check=True)
    assert interface(folded) == interface(model)
    assert op_counts(folded)["BatchNormalization"] == 0
    assert len(report.folded) == batch_norm_count(module) and not report.kept
    assert_close(run(folded, {"x": x})[0], expected, f"{name} converted and folded vs torch eval")


# --------------------------------------------------------------------------- committed models

# BatchNormalization nodes in each committed torch export (all follow a Conv/Linear, or follow a
# ReLU and precede a Linear): every one folds. Keras exports have none (affine chains, issue 3).
COMMITTED_BN = {
    "mlp_keras_style": 1, "mlp_keras_style_dynamo": 1,
    "cnn_conv_bn_relu": 3, "cnn_conv_bn_relu_dynamo": 3,
    "mlp_keras": 0, "cnn_keras": 0,
}


def test_every_committed_model_is_covered():
    assert {p.stem for p in MODELS_DIR.glob("*.onnx")} == set(COMMITTED_BN)
    assert all(MODELS_DIR.joinpath(f"{name}.npz").exists() for name in COMMITTED_BN)


def load_committed(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray], str]:
    model = onnx.load(MODELS_DIR / f"{name}.onnx")
    with np.load(MODELS_DIR / f"{name}.npz") as data:
        inputs = {k.removeprefix("input__"): data[k] for k in data.files if k.startswith("input__")}
        expected = {k.removeprefix("expected__"): data[k] for k in data.files if k.startswith("expected__")}
        source = str(data["source"])
    assert list(inputs) == [i.name for i in model.graph.input]
    assert list(expected) == [o.name for o in model.graph.output]
    return model, inputs, expected, source


@pytest.mark.parametrize("name", list(COMMITTED_BN))
def test_committed_model_folds_and_matches_framework(name):
    model, inputs, expected, source = load_committed(name)
    assert op_counts(model)["BatchNormalization"] == COMMITTED_BN[name]

    folded, report = fold(model)

    onnx.checker.check_model(folded, full_check=True)
    assert interface(folded) == interface(model)
    assert op_counts(folded)["BatchNormalization"] == 0
    assert sum(d.op == "BatchNormalization" for d in report.folded) == COMMITTED_BN[name]
    assert not [d for d in report.kept if d.op == "BatchNormalization"]
    if source.startswith("torch"):  # nothing but the BN nodes may change
        check_folded(model, folded)
    outputs = run(folded, inputs)
    originals = run(model, inputs)
    for out, original, (out_name, reference) in zip(outputs, originals, expected.items()):
        assert_close(out, reference, f"{name}:{out_name} folded vs {source}")
        assert_close(out, original, f"{name}:{out_name} folded vs unfolded")
