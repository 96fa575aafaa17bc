"""Batch norm as real exporters decompose it (issue 3): Keras 3 exports and torch modules whose
batch norm is written out as arithmetic, folded and compared with the framework's own output.

Keras writes no BatchNormalization node: each BN is Sub(mean) -> Mul(gamma/sqrt(var+eps)) ->
Add(beta), Dense is MatMul -> Add(bias), and no-op Casts sit between most ops. After folding only
the layers and their bias Adds may remain. The reference is the framework (Keras's
`model.predict`, stored in the committed .npz or computed here; torch's eval forward), and also the
unfolded ONNX model in unoptimised onnxruntime (through `fold_checked`).
Tolerance: fp32, atol 1e-5 / rtol 1e-4 (onnxruntime's own op tests).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from builders import (
    TOLERANCE,
    compare,
    count_ops,
    fold_checked,
    noop_casts,
    run_unoptimised,
)

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
ATOL, RTOL = TOLERANCE["fp32"]
AFFINE = ("Sub", "Mul", "Div")


def assert_close(actual, expected, what: str) -> None:
    problem = compare(actual, expected, ATOL, RTOL)
    assert problem is None, f"{what}: {problem}"


def assert_only_layers_left(model: onnx.ModelProto, folded: onnx.ModelProto, report) -> None:
    """No affine chain and no Cast left: every Add is a Dense layer's bias (one per MatMul)."""
    ops = count_ops(folded)
    assert not any(ops[op] for op in AFFINE), ops
    assert ops["Add"] == count_ops(model)["MatMul"], f"Adds beyond the Dense biases: {ops}"
    assert ops["Cast"] == 0
    assert report.removed_casts == noop_casts(model) == count_ops(model)["Cast"]
    assert not report.kept, [d.describe() for d in report.kept]
    assert all(d.op == "affine" for d in report.folded)


# --- the committed Keras exports ----------------------------------------------------------


def load_committed(name: str):
    model = onnx.load(MODELS_DIR / f"{name}.onnx")
    with np.load(MODELS_DIR / f"{name}.npz") as data:
        inputs = {k.removeprefix("input__"): data[k] for k in data.files if k.startswith("input__")}
        expected = {k.removeprefix("expected__"): data[k] for k in data.files
                    if k.startswith("expected__")}
        source = str(data["source"])
    assert source.startswith("keras"), source
    return model, inputs, expected


@pytest.mark.parametrize("name", ["mlp_keras", "cnn_keras"])
def test_committed_keras_export_folds_every_batch_norm(name):
    model, inputs, expected = load_committed(name)
    batch_norms = count_ops(model)["Sub"]  # Keras writes one Sub(mean) per BatchNormalization
    assert batch_norms >= 1 and count_ops(model)["BatchNormalization"] == 0

    folded, report = fold_checked(model, inputs)

    assert len(report.folded) == batch_norms, [d.describe() for d in report.decisions]
    assert_only_layers_left(model, folded, report)
    outputs = run_unoptimised(folded, inputs)
    for out_name, reference in expected.items():
        assert_close(outputs[out_name], reference, f"{name}:{out_name} folded vs Keras predict")


def test_committed_keras_cnn_keeps_its_layout_transposes():
    """The channels-last Conv2D + BN folds into the Conv through its layout Transposes, which
    stay: the data still arrives and leaves in NHWC."""
    model, inputs, _ = load_committed("cnn_keras")
    folded, report = fold_checked(model, inputs)
    assert count_ops(folded)["Transpose"] == count_ops(model)["Transpose"]
    assert sorted(d.direction for d in report.folded) == ["backward"] * count_ops(model)["Conv"]
    assert {d.into for d in report.folded} == {n.name for n in model.graph.node
                                              if n.op_type == "Conv"}


# --- a Keras model built, trained and exported here ---------------------------------------


@pytest.fixture(scope="module")
def keras():
    os.environ["KERAS_BACKEND"] = "torch"  # before the first import of keras
    import keras

    assert keras.backend.backend() == "torch", "keras was imported earlier with another backend"
    return keras


def test_fresh_keras_dense_bn_on_sequences_folds_and_matches_predict(keras, tmp_path):
    """Dense -> BN -> ReLU -> BN -> Dense on [batch, seq, features]: Keras normalises the last
    (feature) axis; the first BN folds backward into its Dense, the second forward."""
    keras.utils.set_random_seed(0)
    layers = keras.layers
    seq, features = 7, 4
    model = keras.Sequential([
        keras.Input((seq, features)),
        layers.Dense(6),
        layers.BatchNormalization(momentum=0.5),  # so that two steps move the statistics
        layers.ReLU(),
        layers.BatchNormalization(momentum=0.5),
        layers.Dense(3),
    ])
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 1.5, (64, seq, features)).astype(np.float32)
    target = rng.normal(0.0, 1.0, (64, seq, 3)).astype(np.float32)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(x, target, batch_size=32, epochs=1, verbose=0)  # two steps
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = (np.asarray(w) for w in layer.get_weights())
            assert min(np.abs(gamma - 1).max(), np.abs(beta).max(), np.abs(mean).max(),
                       np.abs(var - 1).max()) > 0.05, "BN parameters still at their initial values"
    sample = rng.normal(0.5, 1.5, (5, seq, features)).astype(np.float32)
    expected = model.predict(sample, verbose=0)
    path = tmp_path / "dense_bn_seq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.export(str(path), format="onnx", verbose=False)
    exported = onnx.load(path)
    assert count_ops(exported)["Sub"] == 2 and count_ops(exported)["BatchNormalization"] == 0
    feeds = {exported.graph.input[0].name: sample}
    (output,) = [o.name for o in exported.graph.output]
    assert_close(run_unoptimised(exported, feeds)[output], expected, "export vs Keras predict")

    folded, report = fold_checked(exported, feeds)

    assert sorted(d.direction for d in report.folded) == ["backward", "forward"]
    assert_only_layers_left(exported, folded, report)
    assert count_ops(folded) == Counter(MatMul=2, Add=2, Relu=1)
    assert_close(run_unoptimised(folded, feeds)[output], expected, "folded vs Keras predict")


# --- torch modules that write batch norm out as arithmetic --------------------------------


class DecomposedBatchNorm(nn.Module):
    """Batch norm as some code bases write it: buffers and `(x - mean) / sqrt(var + eps) * gamma
    + beta`. `shape`: the buffers' shape, e.g. [1, C, 1, 1] after a Conv, [C] after a Linear."""

    def __init__(self, shape, seed: int, eps: float = 1e-5):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        rand = lambda lo, hi: lo + (hi - lo) * torch.rand(shape, generator=generator)
        sign = torch.where(torch.rand(shape, generator=generator) < 0.3, -1.0, 1.0)
        self.register_buffer("mean", torch.randn(shape, generator=generator))
        self.register_buffer("var", rand(0.3, 3.0))
        self.register_buffer("gamma", sign * rand(0.5, 2.0))
        self.register_buffer("beta", torch.randn(shape, generator=generator))
        self.eps = eps

    def forward(self, x):
        return (x - self.mean) / torch.sqrt(self.var + self.eps) * self.gamma + self.beta


TORCH_CASES = {
    # name: (module builder, input shape without batch)
    # Conv -> BN backward, Linear -> BN backward, ReLU -> BN -> Linear forward.
    "cnn": (lambda shared: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), DecomposedBatchNorm((1, 8, 1, 1), seed=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 12), DecomposedBatchNorm((12,), seed=2), nn.ReLU(),
        DecomposedBatchNorm((12,) if shared else (1, 12), seed=2 if shared else 3),
        nn.Linear(12, 4),
    ), (3, 10, 10)),
    # Linear on [batch, seq, features] (MatMul + Add), BN on the features.
    "sequence": (lambda shared: nn.Sequential(
        nn.Linear(4, 6), DecomposedBatchNorm((6,), seed=4), nn.ReLU(),
        DecomposedBatchNorm((6,), seed=4 if shared else 5), nn.Linear(6, 3),
    ), (7, 4)),
}


def torch_export(module: nn.Module, sample: np.ndarray, path: Path, exporter: str):
    """The exporters' default settings (constant folding / optimizer on), dynamic batch."""
    options = dict(input_names=["x"], output_names=["y"])
    if exporter == "dynamo":
        options |= dict(dynamo=True, external_data=False, verbose=False,
                        dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        options |= dict(dynamo=False, dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.from_numpy(sample[:4]),), str(path), **options)
    return onnx.load(path)


def decomposed_case(name: str, shared: bool = False):
    build, shape = TORCH_CASES[name]
    torch.manual_seed(sum(map(ord, name)))
    module = build(shared).eval()
    batch_norms = sum(isinstance(m, DecomposedBatchNorm) for m in module.modules())
    x = np.random.default_rng(0).normal(0.3, 1.2, (5, *shape)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    return module, x, expected, batch_norms


def assert_folded_to_layers(model, folded, report, batch_norms: int) -> None:
    assert len(report.folded) == batch_norms, [d.describe() for d in report.decisions]
    assert not report.kept, [d.describe() for d in report.kept]
    ops = count_ops(folded)
    assert not any(ops[op] for op in AFFINE), ops
    assert ops["Identity"] == 0, ops
    # Whatever is left is the layers: Gemm/Conv take their biases; a MatMul keeps one Add each.
    assert ops["Add"] == ops["MatMul"], ops


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_torch_decomposed_batch_norm_folds_and_matches_torch(name, exporter, tmp_path):
    module, x, expected, batch_norms = decomposed_case(name)
    model = torch_export(module, x, tmp_path / "model.onnx", exporter)
    assert count_ops(model)["Sub"] == batch_norms and count_ops(model)["BatchNormalization"] == 0

    folded, report = fold_checked(model, {"x": x})

    assert_folded_to_layers(model, folded, report, batch_norms)
    assert_close(run_unoptimised(folded, {"x": x})["y"], expected, f"{name} folded vs torch")


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_torchscript_shared_equal_buffers_fold_and_leave_nothing_behind(name, tmp_path):
    """TorchScript writes equal tensors once and reads them elsewhere through Identity nodes: two
    batch norms with equal buffers; both fold, and the Identities and the initializers they read
    are gone (`fold_checked` asserts no dead constants)."""
    module, x, expected, batch_norms = decomposed_case(name, shared=True)
    model = torch_export(module, x, tmp_path / "model.onnx", "torchscript")
    assert count_ops(model)["Identity"] > 0, "the exporter did not share the equal buffers"

    folded, report = fold_checked(model, {"x": x})

    assert_folded_to_layers(model, folded, report, batch_norms)
    assert_close(run_unoptimised(folded, {"x": x})["y"], expected, f"{name} folded vs torch")
