"""Rebuild the example models in models/ from seeded torch and Keras 3 training runs.

    python models/build_models.py

Every model is trained for a few steps on synthetic data, so its batch norms carry trained-looking
parameters (gamma != 1, beta != 0, running mean != 0, running var != 1: identity-like batch norms
would let wrong folding pass unnoticed). Beside each ``<name>.onnx`` goes ``<name>.npz`` with sample
inputs (``input__<graph input name>``) and the framework's own eval-mode outputs on them
(``expected__<graph output name>``: torch's eval forward, or Keras's ``model.predict``), so tests
can compare a folded model with the framework without running it. ``source`` names the framework.

Keras runs on its torch backend (tensorflow is not a dependency); KERAS_BACKEND is forced to torch.
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ["KERAS_BACKEND"] = "torch"  # must precede the first keras import

import numpy as np
import onnx
import torch
from torch import nn

MODELS_DIR = Path(__file__).resolve().parent
SEED = 0
SAMPLE_BATCH = 7  # differs from every channel count of the models (3, 5, 8, 16, 24, 32, 2, 10)
MAX_BYTES = 200_000


# --------------------------------------------------------------------------- synthetic data


def _classification_data(rng: np.random.Generator, shape: tuple[int, ...], classes: int, n: int):
    """Inputs away from zero mean and unit variance, labels from a fixed random projection."""
    x = rng.normal(0.5, 1.5, size=(n, *shape)).astype(np.float32)
    projection = rng.normal(size=(int(np.prod(shape)), classes))
    y = np.argmax(x.reshape(n, -1) @ projection, axis=1).astype(np.int64)
    return x, y


# --------------------------------------------------------------------------- torch models


class _KerasStyleMlp(nn.Sequential):
    """The seed's Keras MLP in torch: Dense 5->16 ReLU, Dense 16->32 ReLU, BN, Dense 32->2 Softmax."""

    def __init__(self) -> None:
        super().__init__(
            nn.Linear(5, 16), nn.ReLU(),
            nn.Linear(16, 32), nn.ReLU(),
            nn.BatchNorm1d(32),
            nn.Linear(32, 2), nn.Softmax(dim=1),
        )


class _ConvBnReluCnn(nn.Sequential):
    """Conv-BN-ReLU twice (the second grouped and strided), global pooling, Linear-BN-ReLU, Linear."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(16, 24), nn.BatchNorm1d(24), nn.ReLU(),
            nn.Linear(24, 10),
        )


def _train_torch(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int) -> nn.Module:
    """A few Adam steps in train mode: moves gamma/beta and the running statistics."""
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    # The models that end in Softmax output probabilities; the others output logits.
    ends_in_softmax = isinstance(list(model.children())[-1], nn.Softmax)
    model.train()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        batch = torch.randperm(len(xt), generator=generator)[:32]
        out = model(xt[batch])
        logits = torch.log(out.clamp_min(1e-7)) if ends_in_softmax else out
        loss = nn.functional.cross_entropy(logits, yt[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _check_trained_looking(name: str, gamma, beta, mean, var) -> None:
    """Refuse to write a model whose batch norm is (nearly) the identity map."""
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    spread = {
        "gamma": np.abs(gamma - 1).max(), "beta": np.abs(beta).max(),
        "mean": np.abs(mean).max(), "var": np.abs(var - 1).max(),
    }
    trivial = [k for k, v in spread.items() if v < 0.05]
    if trivial:
        raise RuntimeError(f"{name}: batch norm parameters still at their initial values: {trivial}")


def _torch_batch_norms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# Both exporters fuse Conv+BN by default (TorchScript while constant folding, dynamo in its
# onnxscript optimizer, which fuses Gemm+BN too): the example models are exported with those passes
# off, so that they still hold the BatchNormalization nodes that bnfold is about.


def _export_torchscript(model: nn.Module, sample: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based export"
        torch.onnx.export(
            model, (sample,), str(path), dynamo=False, do_constant_folding=False,
            input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )


def _export_dynamo(model: nn.Module, sample: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model, (sample,), str(path), dynamo=True, optimize=False, external_data=False, verbose=False,
        input_names=["x"], output_names=["y"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )


def _build_torch(name: str, model: nn.Module, input_shape: tuple[int, ...], classes: int) -> None:
    rng = np.random.default_rng(SEED)
    x, y = _classification_data(rng, input_shape, classes, n=512)
    _train_torch(model, x, y, steps=60)
    for bn in _torch_batch_norms(model):
        _check_trained_looking(name, bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var)
    sample_x, _ = _classification_data(rng, input_shape, classes, n=SAMPLE_BATCH)
    with torch.no_grad():
        expected = model(torch.from_numpy(sample_x)).numpy()
    for exporter, suffix in ((_export_torchscript, ""), (_export_dynamo, "_dynamo")):
        path = MODELS_DIR / f"{name}{suffix}.onnx"
        exporter(model, torch.from_numpy(sample_x[:4]), path)
        _save_samples(path, {"x": sample_x}, {"y": expected}, source=f"torch {torch.__version__} eval")


# --------------------------------------------------------------------------- Keras models


def _keras():
    import keras

    keras.utils.set_random_seed(SEED)
    return keras


def _keras_seed_mlp(keras):
    """The seed example, layer for layer."""
    layers = keras.layers
    return keras.Sequential([
        keras.Input((5,)),
        layers.Dense(16, activation="relu"),
        layers.Dense(32, activation="relu"),
        layers.BatchNormalization(axis=1),
        layers.Dense(2, activation="softmax"),
    ])


def _keras_cnn(keras):
    """Channels-last Conv2D + BatchNormalization blocks (the first conv without bias, as is usual)."""
    layers = keras.layers
    return keras.Sequential([
        keras.Input((16, 16, 3)),
        layers.Conv2D(8, 3, padding="same", use_bias=False),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.MaxPooling2D(2),
        layers.Conv2D(16, 3, padding="same"),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.GlobalAveragePooling2D(),
        layers.Dense(10, activation="softmax"),
    ])


def _build_keras(name: str, make_model, input_shape: tuple[int, ...], classes: int) -> None:
    keras = _keras()
    model = make_model(keras)
    rng = np.random.default_rng(SEED)
    x, y = _classification_data(rng, input_shape, classes, n=512)
    model.compile(optimizer=keras.optimizers.Adam(2e-2), loss="sparse_categorical_crossentropy")
    # 16 steps per epoch; Keras's BN momentum 0.99 needs a few hundred steps to move its statistics.
    model.fit(x, y, batch_size=32, epochs=15, verbose=0, shuffle=True)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            _check_trained_looking(name, *(np.asarray(w) for w in layer.get_weights()))
    sample_x, _ = _classification_data(rng, input_shape, classes, n=SAMPLE_BATCH)
    expected = model.predict(sample_x, verbose=0)
    path = MODELS_DIR / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.export(str(path), format="onnx", verbose=False)
    graph = onnx.load(path).graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise RuntimeError(f"{name}: expected one input and one output, got {len(graph.input)}/{len(graph.output)}")
    _save_samples(path, {graph.input[0].name: sample_x}, {graph.output[0].name: expected},
                  source=f"keras {keras.__version__} ({keras.backend.backend()} backend) predict")


# --------------------------------------------------------------------------- output


def _save_samples(model_path: Path, inputs: dict, expected: dict, source: str) -> None:
    arrays = {f"input__{k}": v for k, v in inputs.items()}
    arrays |= {f"expected__{k}": np.asarray(v) for k, v in expected.items()}
    np.savez(model_path.with_suffix(".npz"), source=np.array(source), **arrays)


def op_counts(path: Path) -> dict[str, int]:
    model = onnx.load(path)
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def _check(path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise RuntimeError(f"{path.name} is {size} bytes, over the {MAX_BYTES} byte budget")
    if Path(f"{path}.data").exists():
        raise RuntimeError(f"{path.name} was written with external data")


BUILDS = {
    "mlp_keras_style": lambda: _build_torch("mlp_keras_style", _KerasStyleMlp(), (5,), 2),
    "cnn_conv_bn_relu": lambda: _build_torch("cnn_conv_bn_relu", _ConvBnReluCnn(), (3, 16, 16), 10),
    "mlp_keras": lambda: _build_keras("mlp_keras", _keras_seed_mlp, (5,), 2),
    "cnn_keras": lambda: _build_keras("cnn_keras", _keras_cnn, (16, 16, 3), 10),
}


def main() -> int:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # same float summation order on every machine
    failed = []
    for name, build in BUILDS.items():
        try:
            # torch.onnx and Keras chatter on stdout/stderr; keep the summary readable.
            with tempfile.TemporaryFile("w+") as sink, _redirect(sink):
                torch.manual_seed(SEED)
                build()
        except Exception as err:  # report every failing export, then fail
            failed.append(name)
            print(f"{name}: FAILED: {type(err).__name__}: {err}", file=sys.stderr)
    for path in sorted(MODELS_DIR.glob("*.onnx")):
        _check(path)
        print(f"{path.name:32} {path.stat().st_size:>7} B  {op_counts(path)}")
    return 1 if failed else 0


class _redirect:
    """Send file descriptors 1 and 2 (C++ and Python output alike) to ``sink`` for a while."""

    def __init__(self, sink) -> None:
        self._sink = sink

    def __enter__(self):
        sys.stdout.flush(), sys.stderr.flush()
        self._saved = os.dup(1), os.dup(2)
        os.dup2(self._sink.fileno(), 1), os.dup2(self._sink.fileno(), 2)

    def __exit__(self, *exc):
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(self._saved[0], 1), os.dup2(self._saved[1], 2)
        os.close(self._saved[0]), os.close(self._saved[1])
        if exc[0] is not None:  # show what the framework said before failing
            self._sink.seek(0)
            sys.stderr.write(self._sink.read()[-4000:])
        return False


if __name__ == "__main__":
    sys.exit(main())
