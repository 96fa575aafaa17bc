"""Folding batch norms before static int8 quantization: op counts, latency and accuracy.

    python benchmarks/bench_quantize.py               # 64 calibration samples, 500 timed runs
    python benchmarks/bench_quantize.py --runs 20 --samples 8 --eval 16   # a smoke run

For each model, onnxruntime.quantization.quantize_static (QDQ format, int8 activations and
weights, per tensor unless `--per-channel`, MinMax calibration over `--samples` random inputs) quantizes four variants:

- orig:        the model as exported
- orig+pre:    after onnxruntime's preprocess (quant_pre_process: symbolic shape inference,
               onnxruntime's basic graph optimizations, onnx shape inference)
- fold:        after `bnfold.fold`
- fold+pre:    after `bnfold.fold`, then the preprocess (the recipe in the README)

The models: models/mlp_keras.onnx (Keras: Dense -> ReLU -> BatchNormalization, the BN decomposed
into Sub/Mul/Add, float Casts between the ops), a Gemm -> BatchNormalization -> Relu -> Gemm model
built here with onnx.helper (what torch exports for Linear -> BatchNorm1d with constant folding off),
and models/cnn_conv_bn_relu.onnx (torch: Conv-BN-ReLU x2, Linear-BN1d-ReLU, Linear).

Columns:
- nodes, QDQ:   nodes of the quantized file, and how many of them are QuantizeLinear/DequantizeLinear
- bn-ops:       BatchNormalization, Sub, Mul, Add, Div, Cast nodes in the quantized file
                (a Keras Dense's bias Add is counted too)
- run float:    float compute nodes left in onnxruntime's optimized graph (default optimizations:
                the graph a session actually runs, saved with optimized_model_filepath): any node
                that is not an integer kernel (QLinear*, QGemm, ...), not a Q/DQ and not a pure
                data-movement op; these run in float between a DequantizeLinear and a QuantizeLinear
- run QDQ:      QuantizeLinear/DequantizeLinear left in that graph (2 = one integer chain: the
                input's quantize and the output's dequantize)
- p50 us:       median latency of one batch-1 inference (intra-op threads 1, inter-op 1,
                sequential execution), the variants of a model timed alternately in one process
                after a warm-up, `--runs` runs each
- max|d|, mean|d|, agree: against the float model on `--eval` other random inputs: the largest
                and the mean absolute output difference, and the share of inputs whose argmax
                class agrees

The inputs are standard normal (the models' own sample inputs in models/*.npz have a standard
deviation of about 1.4); calibration and evaluation inputs come from different seeds.
"""

from __future__ import annotations

import argparse
import collections
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import bnfold  # noqa: E402  (the checkout's bnfold, not an installed one)

VARIANTS = ("orig", "orig+pre", "fold", "fold+pre")
_QDQ = {"QuantizeLinear", "DequantizeLinear"}
_BN_OPS = ("BatchNormalization", "Sub", "Mul", "Add", "Div", "Cast")
# Ops that only move or select data (they run on int8 tensors as well as float ones).
_DATA_MOVEMENT = {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity",
                  "MaxPool", "Relu", "Concat", "Shape", "Gather", "Slice"}


# --------------------------------------------------------------------------- models


def make_gemm_bn(path: Path, features: int = 16, hidden: int = 32, classes: int = 10,
                 seed: int = 0) -> Path:
    """Gemm -> BatchNormalization -> Relu -> Gemm, as torch exports Linear -> BatchNorm1d."""
    rng = np.random.default_rng(seed)
    tensors = {
        "fc1.weight": rng.normal(0, 1 / np.sqrt(features), (hidden, features)),
        "fc1.bias": rng.normal(0, 0.1, hidden),
        "bn.weight": rng.uniform(0.5, 1.5, hidden),
        "bn.bias": rng.normal(0, 0.2, hidden),
        "bn.running_mean": rng.normal(0, 0.3, hidden),
        "bn.running_var": rng.uniform(0.3, 2.0, hidden),
        "fc2.weight": rng.normal(0, 1 / np.sqrt(hidden), (classes, hidden)),
        "fc2.bias": rng.normal(0, 0.1, classes),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], "fc1", transB=1),
        helper.make_node("BatchNormalization",
                         ["h", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
                         ["n"], "bn", epsilon=1e-5),
        helper.make_node("Relu", ["n"], ["r"], "relu"),
        helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["y"], "fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "gemm_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(a.astype(np.float32), name) for name, a in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def models(work: Path) -> dict[str, Path]:
    return {"keras mlp (Dense-ReLU-BN)": REPO / "models" / "mlp_keras.onnx",
            "gemm-bn": make_gemm_bn(work / "gemm_bn.onnx"),
            "cnn conv-bn-relu": REPO / "models" / "cnn_conv_bn_relu.onnx"}


# --------------------------------------------------------------------------- quantizing


def input_spec(path: Path) -> tuple[str, tuple[int, ...]]:
    """The model's one input: its name and its shape at batch 1."""
    (value,) = onnx.load(path, load_external_data=False).graph.input
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1
                  for d in value.type.tensor_type.shape.dim)
    return value.name, shape


def random_inputs(shape: tuple[int, ...], count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, samples: list[np.ndarray]):
        self._feeds = iter([{name: x} for x in samples])

    def get_next(self):
        return next(self._feeds, None)


def prepare(source: Path, variant: str, work: Path, samples: list[np.ndarray],
            per_channel: bool = False) -> Path:
    """Fold and/or preprocess `source` as `variant` says, then quantize it (QDQ, int8)."""
    stem = f"{source.stem}.{variant.replace('+', '_')}"
    current = source
    if variant.startswith("fold"):
        folded, report = bnfold.fold(str(current))
        if report.kept:
            raise SystemExit(f"{source.name}: bnfold kept {len(report.kept)} batch norm(s)")
        current = work / f"{stem}.folded.onnx"
        onnx.save(folded, current)
    if variant.endswith("+pre"):
        pre = work / f"{stem}.pre.onnx"
        quant_pre_process(str(current), str(pre))
        current = pre
    out = work / f"{stem}.int8.onnx"
    name, _ = input_spec(source)
    quantize_static(str(current), str(out), _Reader(name, samples), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=per_channel)
    return out


# --------------------------------------------------------------------------- measuring


def session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()  # default optimizations (ORT_ENABLE_ALL)
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # not the warning that a saved NCHWc graph is machine-specific
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def is_integer_kernel(op: str) -> bool:
    return op.startswith("QLinear") or op in {"QGemm", "MatMulInteger", "ConvInteger",
                                              "MatMulIntegerToFloat", "DynamicQuantizeLinear"}


def op_counts(quantized: Path, optimized: Path) -> dict:
    saved = collections.Counter(n.op_type for n in onnx.load(quantized).graph.node)
    runtime = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
    float_ops = {op: c for op, c in runtime.items()
                 if op not in _QDQ and op not in _DATA_MOVEMENT and not is_integer_kernel(op)}
    return {"nodes": sum(saved.values()),
            "qdq": sum(saved[op] for op in _QDQ),
            "bn_ops": {op: saved[op] for op in _BN_OPS if saved[op]},
            "run_float": float_ops,
            "run_qdq": sum(runtime[op] for op in _QDQ),
            "runtime": dict(runtime)}


def time_alternately(sessions: dict[str, ort.InferenceSession], feed: dict, runs: int,
                     warmup: int = 50) -> dict[str, float]:
    """Median seconds per run of each session, the sessions run in turn so drift hits all."""
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for key, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feed)
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def accuracy(reference: ort.InferenceSession, candidate: ort.InferenceSession, name: str,
             inputs: list[np.ndarray]) -> dict[str, float]:
    """Largest and mean absolute output difference, and the share of inputs with the same argmax."""
    diffs, agree = [], 0
    for x in inputs:
        (want,) = reference.run(None, {name: x})
        (got,) = candidate.run(None, {name: x})
        diffs.append(np.abs(want.astype(np.float64) - got).ravel())
        agree += int(np.argmax(want) == np.argmax(got))
    diffs = np.concatenate(diffs)
    return {"max_diff": float(diffs.max()), "mean_diff": float(diffs.mean()),
            "agree": agree / len(inputs)}


def measure(source: Path, work: Path, samples: int, runs: int, evals: int,
            per_channel: bool = False) -> dict:
    name, shape = input_spec(source)
    calibration = random_inputs(shape, samples, seed=1)
    held_out = random_inputs(shape, evals, seed=2)
    quantized = {v: prepare(source, v, work, calibration, per_channel) for v in VARIANTS}
    reference = session(source)
    sessions, rows = {"float": reference}, {}
    for variant, path in quantized.items():
        optimized = path.with_suffix(".optimized.onnx")
        sessions[variant] = session(path, optimized)
        rows[variant] = op_counts(path, optimized)
        rows[variant].update(accuracy(reference, sessions[variant], name, held_out))
    latency = time_alternately(sessions, {name: held_out[0]}, runs)
    for variant in rows:
        rows[variant]["p50_us"] = latency[variant] * 1e6
    rows["float"] = {"p50_us": latency["float"] * 1e6}
    return rows


# --------------------------------------------------------------------------- report


def _counts(counts: dict) -> str:
    return " ".join(f"{op}:{c}" for op, c in sorted(counts.items())) or "-"


def print_table(results: dict[str, dict]) -> None:
    header = (f"{'model':<26} {'variant':<9} {'nodes':>5} {'QDQ':>4}  {'bn-ops':<26} "
              f"{'run float':<22} {'run QDQ':>7} {'p50 us':>7} {'vs orig':>7} {'max|d|':>7} "
              f"{'mean|d|':>7} {'agree':>5}")
    print(header)
    print("-" * len(header))
    for model, rows in results.items():
        base = rows["orig"]["p50_us"]
        print(f"{model:<26} {'float':<9} {'':>5} {'':>4}  {'':<26} {'':<22} {'':>7} "
              f"{rows['float']['p50_us']:>7.1f}")
        for variant in VARIANTS:
            r = rows[variant]
            change = (r["p50_us"] / base - 1) * 100
            print(f"{'':<26} {variant:<9} {r['nodes']:>5} {r['qdq']:>4}  "
                  f"{_counts(r['bn_ops']):<26} {_counts(r['run_float']):<22} {r['run_qdq']:>7} "
                  f"{r['p50_us']:>7.1f} {change:>+6.0f}% {r['max_diff']:>7.4f} "
                  f"{r['mean_diff']:>7.4f} {r['agree'] * 100:>4.0f}%")
    print()
    print("runtime graphs (onnxruntime's optimized graph of each int8 model):")
    for model, rows in results.items():
        for variant in VARIANTS:
            print(f"  {model:<26} {variant:<9} {_counts(rows[variant]['runtime'])}")


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="calibration inputs (64)")
    parser.add_argument("--runs", type=int, default=500, help="timed runs per variant (500)")
    parser.add_argument("--eval", type=int, default=256, dest="evals",
                        help="held-out inputs for the accuracy columns (256)")
    parser.add_argument("--per-channel", action="store_true",
                        help="quantize weights per output channel (default: per tensor)")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice to preprocess, per model
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, bnfold {bnfold.__version__}; "
          f"{args.samples} calibration samples, {args.runs} runs, {args.evals} eval inputs, "
          f"weights per {'channel' if args.per_channel else 'tensor'}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {label: measure(path, work, args.samples, args.runs, args.evals,
                                  args.per_channel)
                   for label, path in models(work).items()}
    print_table(results)
    return results


if __name__ == "__main__":
    main()
