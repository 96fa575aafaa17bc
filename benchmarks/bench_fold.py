"""Time and peak memory of `bnfold` folding large models, against a bare onnx load + save.

    python benchmarks/bench_fold.py                 # ResNet-50-sized CNN, 1 GB MLP, 2.25 GB external
    python benchmarks/bench_fold.py --sizes small   # the same three shapes, small: a smoke run
    python benchmarks/bench_fold.py --keep          # leave the generated models in benchmarks/out/

The models are generated with onnx.helper (no framework needed) and random trained-looking
batch norms. Every measurement runs in a fresh Python process; its wall time covers the work only
(not the interpreter start or the imports), its peak is the process's maximum resident set size
(which includes the imports; "idle" in the table is the resident size after them). The page cache
is flushed (sync) before each run; both variants fsync what they write. A full run takes about
5 minutes per repeat on 2 cores, and needs about 10 GB of memory and 7 GB of disk.

- bare:        onnx.load (external data loaded, as onnx does by default) + onnx.save (+ fsync)
- fold:        bnfold.io.load (with its onnx.checker pass) -> bnfold.fold.fold -> bnfold.io.save,
               i.e. `bnfold fold --no-verify`
- fold-nochk:  the same with bnfold.io.load(check=False), to show what the checker costs

Targets (issue 2): fold within 1.3x of the bare time and 1.2x of its peak memory; for the
external-data model, a peak well below the model's size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "benchmarks" / "out"
OPSET = 17
_EXTERNAL_MIN_BYTES = 1024  # as onnx's save_as_external_data: smaller tensors stay inline


# --------------------------------------------------------------------------- model generators


class _Tensors:
    """Makes initializers, either in the model or streamed to one external data file."""

    def __init__(self, seed: int, data_file: Path | None = None):
        self.rng = np.random.default_rng(seed)
        self.initializers: list[TensorProto] = []
        self._data_file = data_file
        self._data = open(data_file, "wb") if data_file else None

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if self._data is None or array.nbytes < _EXTERNAL_MIN_BYTES:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape,
                             data_location=TensorProto.EXTERNAL)
        offset = self._data.tell()
        self._data.write(array.tobytes())
        for key, value in (("location", self._data_file.name), ("offset", str(offset)),
                           ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        self.initializers.append(tensor)
        return name

    def weight(self, name: str, shape: tuple[int, ...], fan_in: int) -> str:
        w = self.rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(1 / np.sqrt(fan_in))
        return self.add(name, w)

    def batch_norm(self, name: str, channels: int) -> list[str]:
        """Trained-looking gamma, beta, mean, var (never the identity)."""
        u = lambda lo, hi: self.rng.uniform(lo, hi, channels).astype(np.float32)
        parts = {"scale": u(0.5, 1.5), "bias": u(-0.5, 0.5), "mean": u(-1, 1), "var": u(0.3, 3.0)}
        return [self.add(f"{name}.{k}", v) for k, v in parts.items()]

    def close(self) -> None:
        if self._data:
            self._data.close()


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="bnfold-bench")
    model.ir_version = 8
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def make_resnet50(path: Path, *, width: int = 64, image: int = 224, classes: int = 1000,
                  seed: int = 0) -> Path:
    """ResNet-50's graph: a 7x7 stem and 16 bottleneck blocks, every Conv (53) followed by a BN.

    `width` is the stem's channel count (64 in ResNet-50, about 25.5 M parameters); the stages use
    width, 2, 4 and 8 times width inside their blocks and four times that at their outputs.
    """
    tensors = _Tensors(seed)
    nodes: list[onnx.NodeProto] = []

    def conv_bn(x: str, name: str, c_in: int, c_out: int, k: int, stride: int = 1, relu: bool = True) -> str:
        w = tensors.weight(f"{name}.conv.weight", (c_out, c_in, k, k), c_in * k * k)
        nodes.append(helper.make_node("Conv", [x, w], [f"{name}.conv"], name=f"{name}.conv",
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.conv", *tensors.batch_norm(f"{name}.bn", c_out)],
                                      [f"{name}.bn"], name=f"{name}.bn", epsilon=1e-5))
        if not relu:
            return f"{name}.bn"
        nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    x = conv_bn("input", "stem", 3, width, 7, stride=2)
    nodes.append(helper.make_node("MaxPool", [x], ["stem.pool"], name="stem.pool",
                                  kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, c = "stem.pool", width
    for stage, (blocks, mid) in enumerate(zip((3, 4, 6, 3), (width, 2 * width, 4 * width, 8 * width))):
        for b in range(blocks):
            name, stride, out = f"layer{stage + 1}.{b}", (2 if b == 0 and stage > 0 else 1), 4 * mid
            y = conv_bn(x, f"{name}.1", c, mid, 1)
            y = conv_bn(y, f"{name}.2", mid, mid, 3, stride)
            y = conv_bn(y, f"{name}.3", mid, out, 1, relu=False)
            shortcut = x if b else conv_bn(x, f"{name}.down", c, out, 1, stride, relu=False)
            nodes.append(helper.make_node("Add", [y, shortcut], [f"{name}.add"], name=f"{name}.add"))
            nodes.append(helper.make_node("Relu", [f"{name}.add"], [f"{name}.out"], name=f"{name}.out"))
            x, c = f"{name}.out", out
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flat"))
    fc_w = tensors.weight("fc.weight", (classes, c), c)
    fc_b = tensors.add("fc.bias", np.zeros(classes, np.float32))
    nodes.append(helper.make_node("Gemm", ["flat", fc_w, fc_b], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "resnet50_like",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        tensors.initializers)
    return _save(graph, path)


def _mlp_graph(tensors: _Tensors, width: int, layers: int, features: int) -> onnx.GraphProto:
    """`layers` square Dense layers, each followed by BN and ReLU; Gemm and MatMul+Add alternate."""
    nodes, x = [], "input"
    for i in range(layers):
        name, fan_in = f"dense{i}", (features if i == 0 else width)
        if i % 2 == 0:  # torch's Linear: Gemm with a [out, in] weight
            w = tensors.weight(f"{name}.weight", (width, fan_in), fan_in)
            b = tensors.add(f"{name}.bias", tensors.rng.normal(0, 0.1, width))
            nodes.append(helper.make_node("Gemm", [x, w, b], [name], name=name, transB=1))
        else:  # Keras's Dense: MatMul by an [in, out] weight, then a bias Add
            w = tensors.weight(f"{name}.weight", (fan_in, width), fan_in)
            b = tensors.add(f"{name}.bias", tensors.rng.normal(0, 0.1, width))
            nodes.append(helper.make_node("MatMul", [x, w], [f"{name}.mm"], name=f"{name}.mm"))
            nodes.append(helper.make_node("Add", [f"{name}.mm", b], [name], name=f"{name}.add"))
        nodes.append(helper.make_node("BatchNormalization", [name, *tensors.batch_norm(f"{name}.bn", width)],
                                      [f"{name}.bn"], name=f"{name}.bn"))
        nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.relu"], name=f"{name}.relu"))
        x = f"{name}.relu"
    nodes[-1].output[0] = "output"
    return helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", width])],
        tensors.initializers)


def make_mlp(path: Path, *, width: int = 4096, layers: int = 15, features: int = 4096,
             seed: int = 0) -> Path:
    """An MLP held in one file (4096 wide, 15 layers: about 1 GB of fp32 weights)."""
    return _save(_mlp_graph(_Tensors(seed), width, layers, features), path)


def make_external_mlp(path: Path, *, width: int = 8192, layers: int = 9, features: int = 8192,
                      seed: int = 0) -> Path:
    """An MLP with its tensors in `<path>.data`, streamed there as generated (8192 wide, 9 layers:
    2.4 GB, more than one protobuf can hold)."""
    tensors = _Tensors(seed, data_file=Path(str(path) + ".data"))
    try:
        graph = _mlp_graph(tensors, width, layers, features)
    finally:
        tensors.close()
    return _save(graph, path)


@dataclass
class Spec:
    name: str
    make: Callable[..., Path]
    full: dict
    small: dict


SPECS = [
    Spec("resnet50", make_resnet50, {}, dict(width=8, image=64)),
    Spec("mlp_1gb", make_mlp, {}, dict(width=512, layers=8, features=512)),
    Spec("mlp_external", make_external_mlp, {}, dict(width=1024, layers=6, features=1024)),
]


# --------------------------------------------------------------------------- measurements


def model_bytes(path: Path) -> int:
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(mode: str, src: str, dst: str) -> None:
    """One measurement, in this fresh process; prints one JSON line."""
    folded = kept = None
    if mode == "bare":
        idle = _rss_mb("VmRSS")
        start, cpu = time.perf_counter(), _cpu_seconds()
        model = onnx.load(src)
        if os.path.exists(src + ".data"):
            onnx.save(model, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=os.path.basename(dst) + ".data")
            _fsync(dst + ".data")
        else:
            onnx.save(model, dst)
        _fsync(dst)  # bnfold.io.save fsyncs what it writes: the same durability for both
    else:
        sys.path.insert(0, str(REPO))  # the checkout this script belongs to, installed or not
        # (`bnfold.fold` the attribute is the function, re-exported by the package.)
        from bnfold.fold import fold
        from bnfold.io import load, save

        idle = _rss_mb("VmRSS")
        start, cpu = time.perf_counter(), _cpu_seconds()
        base_dir = os.path.dirname(os.path.abspath(src))
        model = load(src, check=(mode == "fold"))
        result, report = fold(model, base_dir=base_dir, inplace=True, spill=True)  # as the CLI
        save(result, dst, base_dir=base_dir)
        folded, kept = len(report.folded), len(report.kept)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    print(json.dumps({"seconds": seconds, "cpu": cpu, "peak_mb": _rss_mb("VmHWM"), "idle_mb": idle,
                      "folded": folded, "kept": kept}))


def measure(mode: str, model: Path) -> dict:
    """Run one measurement in a fresh process; its peak is the process's VmHWM."""
    dst = model.with_name(f"{model.stem}.{mode}.onnx")
    os.sync()  # the previous run's writeback must not slow this one down
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", mode, str(model), str(dst)],
                                stdout=subprocess.PIPE, stderr=err)
        out = proc.stdout.read()
        proc.stdout.close()
        _, status, _ = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        for f in (dst, Path(str(dst) + ".data")):
            f.unlink(missing_ok=True)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(f"{mode} on {model.name} exited {proc.returncode}:\n" + "\n".join(tail))
    # The child's own VmHWM: wait4's ru_maxrss would also count the parent's memory, which a
    # forked child carries until it execs.
    return json.loads(out.decode().strip().splitlines()[-1])


def _fmt_mb(mb: float) -> str:
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def run(sizes: str, keep: bool, repeat: int, only: list[str] | None) -> list[dict]:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in SPECS:
        if only and spec.name not in only:
            continue
        path = OUT_DIR / f"{spec.name}{'' if sizes == 'full' else '_' + sizes}.onnx"
        start = time.perf_counter()
        spec.make(path, **(spec.full if sizes == "full" else spec.small))
        size_mb = model_bytes(path) / 2**20
        external = Path(str(path) + ".data").exists()
        print(f"generated {path.name}: {_fmt_mb(size_mb)} in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
        try:
            runs = {mode: [measure(mode, path) for _ in range(repeat)]
                    for mode in ("bare", "fold", "fold-nochk")}
        finally:
            if not keep:
                for f in (path, Path(str(path) + ".data")):
                    f.unlink(missing_ok=True)
        # The fastest run (timing noise only ever adds), and the largest peak (the conservative one).
        best = {mode: {key: min(r[key] for r in rs) for key in ("seconds", "cpu", "idle_mb")}
                | {"peak_mb": max(r["peak_mb"] for r in rs), "folded": rs[0]["folded"], "kept": rs[0]["kept"]}
                for mode, rs in runs.items()}
        for mode in ("fold", "fold-nochk"):
            rows.append({"model": spec.name, "mode": mode, "size_mb": size_mb,
                         "external": external,
                         "bare": best["bare"], "fold": best[mode]})
            print(_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


_HEADER = (f"{'model':13} {'variant':10} {'size':>8} {'bare s':>7} {'fold s':>7} {'ratio':>6} "
           f"{'bare peak':>9} {'fold peak':>9} {'ratio':>6} {'peak/size':>9} "
           f"{'cpu s b/f':>13} {'idle b/f':>13} {'BN folded':>9}")


def _row(r: dict) -> str:
    b, f = r["bare"], r["fold"]
    return (f"{r['model']:13} {r['mode']:10} {_fmt_mb(r['size_mb']):>8} {b['seconds']:7.2f} {f['seconds']:7.2f} "
            f"{f['seconds'] / b['seconds']:5.2f}x {_fmt_mb(b['peak_mb']):>9} {_fmt_mb(f['peak_mb']):>9} "
            f"{f['peak_mb'] / b['peak_mb']:5.2f}x {f['peak_mb'] / r['size_mb']:8.2f}x "
            f"{b['cpu']:6.1f}/{f['cpu']:<6.1f} {_fmt_mb(b['idle_mb']):>6}/{_fmt_mb(f['idle_mb']):<6} "
            f"{f['folded']:>5}/{f['folded'] + f['kept']}")


def _verdicts(r: dict) -> list[str]:
    b, f = r["bare"], r["fold"]
    found = []
    if f["seconds"] > 1.3 * b["seconds"]:
        found.append(f"time {f['seconds'] / b['seconds']:.2f}x > 1.3x")
    if f["peak_mb"] > 1.2 * b["peak_mb"]:
        found.append(f"peak {f['peak_mb'] / b['peak_mb']:.2f}x > 1.2x")
    if r["external"] and f["peak_mb"] > 0.5 * r["size_mb"]:
        found.append(f"peak {f['peak_mb'] / r['size_mb']:.2f}x the model's size (target: well below)")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", choices=("full", "small"), default="full")
    parser.add_argument("--keep", action="store_true", help="leave the generated models in benchmarks/out/")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measurements per variant: the fastest time and the largest peak are reported")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in SPECS])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    rows = run(args.sizes, args.keep, args.repeat, args.only)
    print(_HEADER)
    for r in rows:
        print(_row(r))
    print("\ntargets: fold <= 1.3x bare time, <= 1.2x bare peak; external data: peak well below size")
    for r in rows:
        found = _verdicts(r)
        print(f"  {r['model']:14} {r['mode']:10} {'MISSED: ' + '; '.join(found) if found else 'met'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
