"""How bnfold's passes grow with the number of nodes: fold, insert and inspect on graphs of N
small blocks, against a bare onnx.load + onnx.save of the same model in the same process.

    python benchmarks/bench_passes.py                      # every variant at 500 and 5000 blocks,
                                                           # the main ones (conv, insert) at 20000
    python benchmarks/bench_passes.py --variants conv insert --blocks 500 5000
    python benchmarks/bench_passes.py --no-cli             # skip the CLI vs onnxruntime comparison

Each block is a few nodes with `--channels` (default 8) features, so the weights are small and
the cost is the graph's structure. The variants (the shapes issue 11 names):

- conv:        Conv(3x3, pads 1) -> BatchNormalization -> Relu          fold, backward into Conv
- gemm:        Gemm(transB) -> BatchNormalization -> Relu               fold, backward into Gemm
- forward:     Gemm -> Relu -> BatchNormalization (-> the next Gemm)    fold, forward into Gemm
- decomposed:  Conv -> Sub(mean) -> Mul(scale) -> Add(shift) -> Relu    fold, the affine chain
- casts:       Keras style: a no-op Cast around every layer (MatMul, bias Add, BN, Relu)
- matmul:      MatMul without bias -> BatchNormalization -> Relu        fold adds a bias Add
- insert:      Gemm -> Relu                                            insert --all
- inspect:     the gemm model                                          inspect

Every measurement runs in a fresh process per (variant, N), which alternates `--repeat` times
between the bare load + save and bnfold's load + pass + save through the API (`bnfold.load`
with its checker, `fold(..., inplace=True)` or `insert(...)`, `bnfold.save`, which fsyncs:
the bare save is fsynced too), and reports the fastest of each. Peak memory is the process's
VmHWM over each step alone (reset through /proc/self/clear_refs before it). The growth exponent
between N1 and N2 blocks is log(t2 / t1) / log(N2 / N1): 1 is linear, 2 quadratic.

Then, on the 5000-block conv model, `bnfold fold IN -o OUT` (with its onnxruntime check) against
onnxruntime's basic offline optimisation of the same model (SessionOptions with
ORT_ENABLE_BASIC and optimized_model_filepath), each a fresh process, timed from spawn to exit.

Targets (issue 11): every fold variant and insert within 5x the bare load + save at 5000 blocks
(moonshot 2x), growth exponent <= 1.15 between 500 and 5000 (and 20000); the CLI fold faster
than onnxruntime's basic optimisation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_fold import _fsync, _rss_mb  # noqa: E402  (the measuring helpers, shared)

OPSET = 17
F = TensorProto.FLOAT


# --------------------------------------------------------------------------- model generators


class _Builder:
    def __init__(self, channels: int, seed: int = 0):
        self.c = channels
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
        return self.const(name, self.rng.standard_normal(shape) / np.sqrt(fan_in))

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def bn(self, x: str, name: str) -> str:
        u = lambda lo, hi: self.rng.uniform(lo, hi, self.c)
        params = [self.const(f"{name}.{k}", v) for k, v in (
            ("scale", u(0.5, 1.5)), ("bias", u(-0.5, 0.5)), ("mean", u(-1, 1)), ("var", u(0.3, 3)))]
        return self.node("BatchNormalization", [x, *params], name)

    def cast(self, x: str, name: str) -> str:
        return self.node("Cast", [x], name, to=F)

    def model(self, x_shape: list, y: str, y_shape: list) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "output"  # the last node's output is the graph's
        graph = helper.make_graph(self.nodes, "blocks", [helper.make_tensor_value_info("input", F, x_shape)],
                                  [helper.make_tensor_value_info("output", F, y_shape)], self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="bnfold-bench-passes")
        model.ir_version = 8
        return model


def make_conv(n: int, c: int, decomposed: bool = False) -> onnx.ModelProto:
    b, x = _Builder(c), "input"
    for i in range(n):
        w = b.weight(f"b{i}.w", (c, c, 3, 3))
        y = b.node("Conv", [x, w, b.const(f"b{i}.b", np.zeros(c))], f"b{i}.conv",
                   kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        if decomposed:  # the form decomposing exporters write: ((y - mean) * a) + shift
            along = (c, 1, 1)
            y = b.node("Sub", [y, b.const(f"b{i}.mean", b.rng.uniform(-1, 1, along))], f"b{i}.sub")
            y = b.node("Mul", [y, b.const(f"b{i}.a", b.rng.uniform(0.5, 1.5, along))], f"b{i}.mul")
            y = b.node("Add", [y, b.const(f"b{i}.shift", b.rng.uniform(-.5, .5, along))], f"b{i}.add")
        else:
            y = b.bn(y, f"b{i}.bn")
        x = b.node("Relu", [y], f"b{i}.relu")
    return b.model(["N", c, 4, 4], x, ["N", c, 4, 4])


def make_gemm(n: int, c: int) -> onnx.ModelProto:
    b, x = _Builder(c), "input"
    for i in range(n):
        y = b.node("Gemm", [x, b.weight(f"b{i}.w", (c, c)), b.const(f"b{i}.b", np.zeros(c))],
                   f"b{i}.gemm", transB=1)
        x = b.node("Relu", [b.bn(y, f"b{i}.bn")], f"b{i}.relu")
    return b.model(["N", c], x, ["N", c])


def make_forward(n: int, c: int) -> onnx.ModelProto:
    """Keras's order Dense -> ReLU -> BN -> Dense: each BN folds forward into the next Gemm."""
    b, x = _Builder(c), "input"
    for i in range(n + 1):
        y = b.node("Gemm", [x, b.weight(f"b{i}.w", (c, c)), b.const(f"b{i}.b", np.zeros(c))],
                   f"b{i}.gemm", transB=1)
        if i < n:
            x = b.bn(b.node("Relu", [y], f"b{i}.relu"), f"b{i}.bn")
    return b.model(["N", c], y, ["N", c])


def make_casts(n: int, c: int) -> onnx.ModelProto:
    """Keras 3 style: no-op Casts to float around every layer; MatMul + bias Add Dense layers."""
    b, x = _Builder(c), "input"
    for i in range(n):
        x = b.cast(x, f"b{i}.cast_in")
        y = b.node("MatMul", [x, b.cast(b.weight(f"b{i}.w", (c, c)), f"b{i}.cast_w")], f"b{i}.mm")
        y = b.cast(y, f"b{i}.cast_mm")
        y = b.cast(b.node("Add", [y, b.const(f"b{i}.b", np.zeros(c))], f"b{i}.add"), f"b{i}.cast_add")
        y = b.cast(b.bn(y, f"b{i}.bn"), f"b{i}.cast_bn")
        x = b.cast(b.node("Relu", [y], f"b{i}.relu"), f"b{i}.cast_relu")
    return b.model(["N", c], x, ["N", c])


def make_matmul(n: int, c: int) -> onnx.ModelProto:
    """Keras's Dense(use_bias=False) -> BN: the fold must add a bias Add after each MatMul."""
    b, x = _Builder(c), "input"
    for i in range(n):
        y = b.node("MatMul", [x, b.weight(f"b{i}.w", (c, c))], f"b{i}.mm")
        x = b.node("Relu", [b.bn(y, f"b{i}.bn")], f"b{i}.relu")
    return b.model(["N", c], x, ["N", c])


def make_dense(n: int, c: int) -> onnx.ModelProto:
    """Gemm -> Relu layers, no batch norm: what `insert --all` starts from."""
    b, x = _Builder(c), "input"
    for i in range(n):
        y = b.node("Gemm", [x, b.weight(f"b{i}.w", (c, c)), b.const(f"b{i}.b", np.zeros(c))],
                   f"b{i}.gemm", transB=1)
        x = b.node("Relu", [y], f"b{i}.relu")
    return b.model(["N", c], x, ["N", c])


# variant -> (generator, pass)
VARIANTS = {
    "conv": (make_conv, "fold"),
    "gemm": (make_gemm, "fold"),
    "forward": (make_forward, "fold"),
    "decomposed": (lambda n, c: make_conv(n, c, decomposed=True), "fold"),
    "casts": (make_casts, "fold"),
    "matmul": (make_matmul, "fold"),
    "insert": (make_dense, "insert"),
    "inspect": (make_gemm, "inspect"),
}
MAIN_VARIANTS = ("conv", "insert")  # also run at the largest size


def write(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


# --------------------------------------------------------------------------- measurements


def _peak_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pass




def _child(variant: str, src: str, repeat: int) -> None:
    """Alternate bare and bnfold `repeat` times on `src` in this process; print one JSON line."""
    sys.path.insert(0, str(REPO))  # the checkout this script belongs to
    import bnfold
    from bnfold.fold import fold
    from bnfold.insert import insert
    from bnfold.inspect import inspect

    kind = VARIANTS[variant][1]
    out = os.path.join(os.path.dirname(src), "out.onnx")
    times = {"bare": [], "bnfold": []}
    peaks = {"bare": 0.0, "bnfold": 0.0}
    summary = ""

    def bare():
        onnx.save(onnx.load(src), out)
        _fsync(out)

    def ours():
        nonlocal summary
        model = bnfold.load(src)
        if kind == "fold":
            result, report = fold(model, inplace=True)
            summary = f"{len(report.folded)} folded, {len(report.kept)} kept"
        elif kind == "insert":
            result, report = insert(model, all_layers=True)
            summary = f"{len(report.insertions)} inserted"
        else:
            report = inspect(model)
            summary = f"{len(report.layers)} layers, {len(report.batchnorms)} batch norms"
            return
        bnfold.save(result, out)

    for _ in range(repeat):
        for mode, step in (("bare", bare), ("bnfold", ours)):
            _peak_reset()
            start = time.perf_counter()
            step()
            times[mode].append(time.perf_counter() - start)
            peaks[mode] = max(peaks[mode], _rss_mb("VmHWM"))
            if os.path.exists(out):
                os.unlink(out)
    print(json.dumps({"bare": min(times["bare"]), "bnfold": min(times["bnfold"]),
                      "bare_peak_mb": peaks["bare"], "bnfold_peak_mb": peaks["bnfold"],
                      "summary": summary}))


def measure(variant: str, blocks: int, channels: int, repeat: int, timeout: float,
            folder: Path) -> dict:
    make = VARIANTS[variant][0]
    path = write(make(blocks, channels), folder / f"{variant}_{blocks}.onnx")
    row = {"variant": variant, "blocks": blocks, "nodes": None,
           "size_mb": path.stat().st_size / 2**20}
    row["nodes"] = len(onnx.load(path).graph.node)
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", variant, str(path), str(repeat)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row["error"] = f"timed out after {timeout:.0f} s"
        return row
    finally:
        path.unlink(missing_ok=True)
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return row
    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return row


def measure_cli(blocks: int, channels: int, repeat: int, folder: Path) -> dict:
    """`bnfold fold` (with its check) against onnxruntime's basic offline optimisation."""
    path = write(make_conv(blocks, channels), folder / f"cli_{blocks}.onnx")
    out = folder / "cli_out.onnx"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ort_script = (
        "import sys, onnxruntime as ort\n"
        "o = ort.SessionOptions()\n"
        "o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC\n"
        "o.optimized_model_filepath = sys.argv[2]\n"
        "ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n")
    commands = {
        "bnfold fold": [sys.executable, "-m", "bnfold", "fold", str(path), "-o", str(out), "--quiet"],
        "ort basic": [sys.executable, "-c", ort_script, str(path), str(out)],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(repeat):
        for name, command in commands.items():
            start = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, env=env)
            times[name].append(time.perf_counter() - start)
            if proc.returncode != 0:
                raise RuntimeError(f"{name} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
            out.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    return {"blocks": blocks, **{k: min(v) for k, v in times.items()}}


def exponent(rows: list[dict], variant: str, small: int, large: int) -> float | None:
    found = {r["blocks"]: r for r in rows if r["variant"] == variant and "bnfold" in r}
    if small not in found or large not in found:
        return None
    return math.log(found[large]["bnfold"] / found[small]["bnfold"]) / math.log(large / small)


def _row(r: dict) -> str:
    head = f"{r['variant']:11} {r['blocks']:>6} {r['nodes']:>7} {r['size_mb']:7.1f}"
    if "error" in r:
        return f"{head}  {r['error']}"
    return (f"{head} {r['bare']:8.3f} {r['bnfold']:8.3f} {r['bnfold'] / r['bare']:7.1f}x "
            f"{r['bare_peak_mb']:7.0f} {r['bnfold_peak_mb']:7.0f}  {r['summary']}")


_HEADER = (f"{'variant':11} {'blocks':>6} {'nodes':>7} {'MB':>7} {'bare s':>8} {'bnfold s':>8} "
           f"{'ratio':>8} {'bare MB':>7} {'ours MB':>7}  result")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--blocks", nargs="+", type=int, default=[500, 5000])
    parser.add_argument("--large", type=int, default=20000,
                        help="the extra size for the main variants (conv, insert); 0: none")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="runs per step; the fastest counts")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per (variant, size)")
    parser.add_argument("--no-cli", action="store_true", help="skip bnfold fold vs onnxruntime")
    parser.add_argument("--cli-blocks", type=int, default=5000)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "SRC", "REPEAT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    rows, cli = [], None
    print(_HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-passes-") as tmp:
        folder = Path(tmp)
        for variant in args.variants:
            sizes = list(args.blocks)
            if args.large and variant in MAIN_VARIANTS and args.large not in sizes:
                sizes.append(args.large)
            for blocks in sizes:
                rows.append(measure(variant, blocks, args.channels, args.repeat, args.timeout, folder))
                print(_row(rows[-1]), flush=True)
        if not args.no_cli:
            cli = measure_cli(args.cli_blocks, args.channels, args.repeat, folder)
    sizes = sorted({r["blocks"] for r in rows})
    print("\ngrowth exponents (bnfold's time), and the target check at 5000 blocks:")
    for variant in args.variants:
        parts = []
        for small, large in zip(sizes, sizes[1:]):
            e = exponent(rows, variant, small, large)
            if e is not None:
                parts.append(f"{small}->{large}: {e:.2f}")
        at = next((r for r in rows if r["variant"] == variant and r["blocks"] == 5000 and "bnfold" in r), None)
        verdict = ""
        if at is not None and VARIANTS[variant][1] != "inspect":
            ratio = at["bnfold"] / at["bare"]
            slow = [e for s, l in zip(sizes, sizes[1:]) if (e := exponent(rows, variant, s, l)) and e > 1.15]
            verdict = "met" if ratio <= 5 and not slow else "MISSED"
            verdict = f"  ratio {ratio:.1f}x: {verdict}"
        print(f"  {variant:11} {', '.join(parts) or '-'}{verdict}")
    if cli is not None:
        print(f"\n{cli['blocks']}-block conv model, fresh processes: bnfold fold (with check) "
              f"{cli['bnfold fold']:.2f} s, onnxruntime basic offline optimisation "
              f"{cli['ort basic']:.2f} s ({cli['bnfold fold'] / cli['ort basic']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cli": cli}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
