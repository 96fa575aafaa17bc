"""The benchmark's model generators, at tiny scale: valid models of the intended shape (no timings)."""

from __future__ import annotations

import collections
import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_fold.py"


def _script(name: str):
    """benchmarks/NAME.py as a module, registered while the tests use it."""
    spec = importlib.util.spec_from_file_location(name, _SCRIPT.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def bench():
    yield from _script("bench_fold")


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _ops(path: Path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)


def test_resnet50_generator_has_resnet50_structure(bench, tmp_path):
    path = bench.make_resnet50(tmp_path / "resnet.onnx", width=2, image=32, classes=5)
    onnx.checker.check_model(str(path), full_check=True)
    ops = _ops(path)
    assert ops["Conv"] == ops["BatchNormalization"] == 53  # stem + 16 blocks x 3 + 4 shortcuts
    assert ops["Add"] == 16 and ops["Gemm"] == 1
    assert _run(path, np.ones((2, 3, 32, 32), np.float32)).shape == (2, 5)


def test_full_size_resnet50_has_resnet50_parameter_count(bench, tmp_path):
    # Counted from the generator's shapes, without writing 100 MB: ResNet-50 has 25.6 M parameters.
    path = bench.make_resnet50(tmp_path / "resnet.onnx", width=64, image=32)
    model = onnx.load(path)
    parameters = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert 25e6 < parameters < 26e6


@pytest.mark.parametrize("make", ["make_mlp", "make_external_mlp"])
def test_mlp_generators(bench, tmp_path, make):
    path = getattr(bench, make)(tmp_path / "mlp.onnx", width=96, layers=4, features=7)
    onnx.checker.check_model(str(path), full_check=True)
    ops = _ops(path)
    assert ops["BatchNormalization"] == 4
    assert ops["Gemm"] == 2 and ops["MatMul"] == 2  # both Dense forms
    external = [t for t in onnx.load(path, load_external_data=False).graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if make == "make_external_mlp":
        assert {t.name for t in external} >= {"dense0.weight", "dense1.weight"}
        assert bench.model_bytes(path) > 3 * 96 * 96 * 4  # the data file holds the weights
    else:
        assert not external
    y = _run(path, np.ones((3, 7), np.float32))
    assert y.shape == (3, 96) and np.isfinite(y).all()


@pytest.fixture(scope="module")
def bench_passes():
    yield from _script("bench_passes")


@pytest.mark.parametrize("variant", ["conv", "gemm", "forward", "decomposed", "casts", "matmul",
                                     "insert"])
def test_pass_benchmark_models_are_valid_and_do_what_they_claim(bench_passes, variant):
    from bnfold.fold import fold
    from bnfold.insert import insert

    make, kind = bench_passes.VARIANTS[variant]
    model = make(6, 4)
    onnx.checker.check_model(model, full_check=True)
    if kind == "insert":
        assert len(insert(model, all_layers=True)[1].insertions) == 6
    else:
        _, report = fold(model)
        assert len(report.folded) == 6 and not report.kept


@pytest.fixture(scope="module")
def bench_quantize():
    yield from _script("bench_quantize")


@pytest.mark.parametrize("model", ["gemm", "keras"])
def test_quantize_benchmark_folded_int8_model_runs_as_one_integer_chain(bench_quantize, tmp_path,
                                                                          model):
    # The README's "Before quantizing": the quantizer leaves a BN (a BatchNormalization node, or
    # Keras's Sub/Mul/Add) in float between DequantizeLinear and QuantizeLinear; after fold and
    # preprocess, onnxruntime runs the int8 model with one quantize at the input and one
    # dequantize at the output.
    source = (bench_quantize.make_gemm_bn(tmp_path / "gemm_bn.onnx") if model == "gemm"
              else bench_quantize.REPO / "models" / "mlp_keras.onnx")
    rows = bench_quantize.measure(source, tmp_path, samples=8, runs=3, evals=8)
    bn_ops = {"BatchNormalization"} if model == "gemm" else {"Sub", "Mul"}
    assert bn_ops <= set(rows["orig"]["run_float"])
    assert rows["orig"]["run_qdq"] > 2
    assert rows["fold+pre"]["run_float"] == {}
    assert rows["fold+pre"]["run_qdq"] == 2
    for variant in bench_quantize.VARIANTS:
        assert 0 < rows[variant]["mean_diff"] < 0.1  # quantized: near the float model, not equal
        assert rows[variant]["p50_us"] > 0
