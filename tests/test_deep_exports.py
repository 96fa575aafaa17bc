"""Deep networks exported from torch fold with the default check, and wrong folds of them fail it.

A 50-layer bottleneck ResNet and an EfficientNet-B0-like net (depthwise convs, squeeze-excite,
SiLU), at reduced width and a small input, with measured-then-perturbed BN statistics, exported
by both exporters with every BatchNormalization kept. Their float32 rounding grows over 50 layers
far beyond a fixed tolerance (the old check refused the folded ResNet-50): the folded model must
pass, match torch's eval output about as closely as the export itself does, and a candidate with
one weight tensor off by 1e-3 relative, or one folded channel off, must fail.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import bnfold
from bnfold.cli import main
from bnfold.verify import run, verify

torch_models = pytest.importorskip("torch_models")

IMAGE = 32
ARCHITECTURES = {
    "resnet50": lambda: torch_models.resnet50(base=16, classes=10),
    "efficientnet_b0": lambda: torch_models.efficientnet_b0(scale=0.5, classes=10),
}
# The dynamo export of the EfficientNet takes ~7 s more: with the slow tests (-m slow).
CASES = [pytest.param(a, e, marks=[pytest.mark.slow] if (a, e) == ("efficientnet_b0", "dynamo")
                      else []) for a in ARCHITECTURES for e in torch_models.RAW_EXPORTERS]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(module, export, folded) by (architecture, exporter), each built once."""
    made = {}

    def get(arch: str, exporter: str):
        if (arch, exporter) not in made:
            module = torch_models.with_statistics(ARCHITECTURES[arch](), IMAGE, seed=len(arch))
            path = tmp_path_factory.mktemp(f"{arch}_{exporter}") / "model.onnx"
            sample = np.random.default_rng(1).standard_normal((2, 3, IMAGE, IMAGE))
            model = torch_models.export(module, sample.astype(np.float32), path, exporter)
            folded, report = bnfold.fold(model)
            assert report.folded and not report.kept, report.to_text()
            made[arch, exporter] = module, model, folded, path
        return made[arch, exporter]

    return get


@pytest.mark.parametrize("arch, exporter", CASES)
def test_deep_export_folds_with_the_default_check_and_matches_torch(exports, arch, exporter):
    module, model, folded, _ = exports(arch, exporter)
    report = verify(model, folded)
    assert report.passed, report.to_text()
    x = np.random.default_rng(3).standard_normal((3, 3, IMAGE, IMAGE)).astype(np.float32)
    expected = torch_models.torch_eval(module, x).astype(np.float64)
    unfolded = np.abs(run(model, {"x": x})["y"] - expected).max()
    refolded = np.abs(run(folded, {"x": x})["y"] - expected).max()
    assert refolded <= 4 * unfolded + 1e-6 * np.abs(expected).max(), (refolded, unfolded)


def test_deep_export_folds_through_the_cli(exports, tmp_path):
    *_, path = exports("resnet50", "torchscript")
    result = CliRunner().invoke(main, ["fold", str(path), "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.onnx").exists() and "verification passed" in result.output


def _rewritten(model: onnx.ModelProto, folded: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The folded weights (not biases): the initializers of rank > 1 that the fold changed."""
    old = {t.name: t.SerializeToString() for t in model.graph.initializer}
    return [t for t in folded.graph.initializer
            if len(t.dims) > 1 and old.get(t.name) != t.SerializeToString()]


def _replaced(folded: onnx.ModelProto, tensor: onnx.TensorProto, value: np.ndarray):
    wrong = onnx.ModelProto()
    wrong.CopyFrom(folded)
    for t in wrong.graph.initializer:
        if t.name == tensor.name:
            t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), t.name))
    return wrong


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_weight_off_by_1e_3_fails(exports, arch, where):
    _, model, folded, _ = exports(arch, "torchscript")
    weights = _rewritten(model, folded)
    tensor = weights[{"first": 0, "middle": len(weights) // 2, "last": -1}[where]]
    value = numpy_helper.to_array(tensor).astype(np.float64) * (1 + 1e-3)
    report = verify(model, _replaced(folded, tensor, value))
    assert not report.passed, report.to_text()
    [out] = report.outputs
    assert out.criterion == "accuracy" and out.e_cand > out.bound


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_folded_channel_with_a_wrong_scale_fails(exports, arch):
    _, model, folded, _ = exports(arch, "torchscript")
    weights = _rewritten(model, folded)
    tensor = weights[len(weights) // 2]
    value = numpy_helper.to_array(tensor).astype(np.float64)
    value[0] *= 1.01  # channel 0 scaled by s * 1.01: one channel's BN folded wrong
    report = verify(model, _replaced(folded, tensor, value))
    assert not report.passed, report.to_text()
