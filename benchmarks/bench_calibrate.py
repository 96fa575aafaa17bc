"""Time and peak memory of `bnfold.calibrate` on 10k samples, against one onnxruntime pass.

    python benchmarks/bench_calibrate.py                    # ResNet-50-sized CNN and 1 GB MLP
    python benchmarks/bench_calibrate.py --sizes small      # the same shapes, small: a smoke run
    python benchmarks/bench_calibrate.py --only mlp_1gb --samples 2000

The models are bench_fold.py's (random trained-looking BNs): the ResNet-50-sized CNN (53 BN,
25.5 M parameters; 49 BN levels) on 32x32 images (its parameter count does not depend on the
image size; 224x224 would take hours per pass on 2 cores), and the 1 GB MLP (15 BN, each a level
of its own). The samples are one float32 .npy per model in a folder, memory-mapped, so that the
data do not count in anyone's memory.

Each measurement runs in a fresh Python process; its peak is the process's VmHWM (so it includes
the imports and the model load), its time covers the work only:
- ort:        one onnxruntime pass (graph optimizations disabled, as calibrate runs them):
              InferenceSession(path) and a run per batch of 32, every graph output fetched;
- exact:      bnfold.io.load + bnfold.calibrate(method="exact") (the time is calibrate's);
- batch:      the same with method="batch" (one pass).

Targets (issue 9): calibrate within (BN levels + 1) passes' time; memory bounded by the model
plus one batch (it does not grow with the number of samples).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "benchmarks" / "out"
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from bench_fold import _rss_mb, make_mlp, make_resnet50  # noqa: E402

SPECS = {  # name: (generator, full sizes, small sizes, input shape of one sample (full, small))
    "resnet50": (make_resnet50, dict(width=64, image=32), dict(width=8, image=32),
                 ((3, 32, 32), (3, 32, 32))),
    "mlp_1gb": (make_mlp, {}, dict(width=512, layers=8, features=512), ((4096,), (512,))),
}
BATCH = 32



def _child(mode: str, model_path: str, data_dir: str, samples: int) -> None:
    """One measurement, in this fresh process; prints one JSON line."""
    import onnxruntime as ort

    idle = _rss_mb("VmRSS")
    x = np.load(os.path.join(data_dir, "samples.npy"), mmap_mode="r")[:samples]
    result: dict = {}
    if mode == "ort":
        start = time.perf_counter()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for i in range(0, len(x), BATCH):
            session.run(None, {name: np.ascontiguousarray(x[i:i + BATCH])})
        result["seconds"] = time.perf_counter() - start
    else:
        from bnfold.calibrate import calibrate
        from bnfold.io import load

        start = time.perf_counter()
        model = load(model_path)
        loaded = time.perf_counter()
        name = next(i.name for i in model.graph.input)
        _, report = calibrate(model, data_dir, method=mode, batch_size=BATCH, limit=samples,
                              base_dir=os.path.dirname(model_path), inplace=True)
        result.update(seconds=time.perf_counter() - loaded, load_seconds=loaded - start,
                      passes=report.passes, levels=report.levels,
                      calibrated=len(report.calibrated), samples=report.samples)
    result.update(peak_mb=_rss_mb("VmHWM"), idle_mb=idle)
    print(json.dumps(result))


def measure(mode: str, model: Path, data_dir: Path, samples: int) -> dict:
    os.sync()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", mode, str(model),
                                 str(data_dir), str(samples)], stdout=subprocess.PIPE, stderr=err)
        out = proc.stdout.read()
        proc.stdout.close()
        if proc.wait() != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(f"{mode} on {model.name} exited {proc.returncode}:\n" +
                               "\n".join(tail))
    return json.loads(out.decode().strip().splitlines()[-1])


def _mb(mb: float) -> str:
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def run(sizes: str, samples: int, only: list[str] | None, modes: list[str], keep: bool) -> list:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (make, full, small, shapes) in SPECS.items():
        if only and name not in only:
            continue
        path = OUT_DIR / f"calibrate_{name}{'' if sizes == 'full' else '_small'}.onnx"
        data_dir = OUT_DIR / f"calibrate_{name}_data"
        data_dir.mkdir(exist_ok=True)
        make(path, **(full if sizes == "full" else small))
        shape = shapes[0] if sizes == "full" else shapes[1]
        rng = np.random.default_rng(0)
        x = np.lib.format.open_memmap(data_dir / "samples.npy", mode="w+", dtype=np.float32,
                                      shape=(samples, *shape))
        for i in range(0, samples, 1000):  # written in pieces: the data never all in memory
            x[i:i + 1000] = rng.standard_normal((min(1000, samples - i), *shape), np.float32)
        x.flush()
        del x
        size_mb = path.stat().st_size / 2**20
        batch_mb = BATCH * int(np.prod(shape)) * 4 / 2**20
        print(f"{name}: model {_mb(size_mb)}, {samples} samples of {list(shape)}, batch "
              f"{BATCH} ({batch_mb:.2f} MB)", file=sys.stderr, flush=True)
        try:
            found = {}
            for mode in modes:
                found[mode] = measure(mode, path, data_dir, samples)
                print(f"  {mode:6} {json.dumps(found[mode])}", file=sys.stderr, flush=True)
        finally:
            if not keep:
                path.unlink(missing_ok=True)
                (data_dir / "samples.npy").unlink(missing_ok=True)
                data_dir.rmdir()
        rows.append({"model": name, "size_mb": size_mb, "batch_mb": batch_mb,
                     "samples": samples, **found})
    return rows


def report(rows: list) -> str:
    lines = [f"{'model':9} {'size':>8} {'variant':7} {'seconds':>8} {'passes':>6} {'x ort':>6} "
             f"{'target':>7} {'peak':>8} {'peak-idle':>9} {'ort peak':>8}"]
    verdicts = []
    for r in rows:
        ort_run = r.get("ort")
        for mode in ("exact", "batch"):
            m = r.get(mode)
            if not m:
                continue
            ratio = m["seconds"] / ort_run["seconds"] if ort_run else float("nan")
            target = m["levels"] + 1 if mode == "exact" else 2
            lines.append(f"{r['model']:9} {_mb(r['size_mb']):>8} {mode:7} {m['seconds']:8.1f} "
                         f"{m['passes']:6} {ratio:5.1f}x {target:6}x {_mb(m['peak_mb']):>8} "
                         f"{_mb(m['peak_mb'] - m['idle_mb']):>9} "
                         f"{_mb(ort_run['peak_mb']) if ort_run else '-':>8}")
            if ort_run:
                ok = ratio <= target
                verdicts.append(f"  {r['model']} {mode}: {ratio:.1f}x one ort pass "
                                f"({'met' if ok else 'MISSED'}: at most {target}x)")
        if ort_run:
            lines.append(f"{r['model']:9} {_mb(r['size_mb']):>8} {'ort':7} "
                         f"{ort_run['seconds']:8.1f} {1:6} {1.0:5.1f}x {'':>7} "
                         f"{_mb(ort_run['peak_mb']):>8} "
                         f"{_mb(ort_run['peak_mb'] - ort_run['idle_mb']):>9}")
    return "\n".join(lines + ["", "targets: exact <= (levels + 1) passes, batch <= 2", *verdicts])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", choices=("full", "small"), default="full")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--only", nargs="+", choices=list(SPECS))
    parser.add_argument("--modes", nargs="+", choices=("ort", "exact", "batch"),
                        default=["ort", "exact", "batch"])
    parser.add_argument("--keep", action="store_true", help="leave the generated files")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "MODEL", "DATA", "N"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, model, data, n = args.child
        _child(mode, model, data, int(n))
        return 0
    rows = run(args.sizes, args.samples, args.only, args.modes, args.keep)
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
