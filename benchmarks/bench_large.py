"""`bnfold fold --no-verify` on large weights of other shapes than bench_fold.py's, against a bare
`onnx.load` + `onnx.save` + fsync of the same model (issue 11, "Large weights"; target 1.3x).

    python benchmarks/bench_large.py                # 453 MB CNN and 1.07 GB MLP, fastest of 3
    python benchmarks/bench_large.py --small        # the same shapes, small: a smoke run
    python benchmarks/bench_large.py --repeat 5 --only cnn
    python benchmarks/bench_large.py --check --only mlp    # also fold with its check: peak memory

The models (seeded, generated with onnx.helper in a child process, single-file):
- cnn: 13 3x3 Conv (1024 channels wide, 12 of them 1024 -> 1024) + BN + Relu, about 453 MB
- mlp: 16 Dense layers 4096 wide (Gemm and MatMul+Add alternate) + BN + Relu, about 1.07 GB

Each run is a fresh process, timed from outside (wall time includes the interpreter start and
the imports, as a user sees it): `python -m bnfold fold IN -o OUT --no-verify` against
`python -c "onnx.load; onnx.save; fsync"`. Runs alternate (bare, fold, bare, fold, ...) so that
both see the same machine; the fastest of the repeats is reported, with the largest VmHWM
(the child's peak resident size, from wait4). The page cache is flushed to disk (sync) before
each run. Note the load (`uptime`) with the figures: the machine is shared.

`--check` also runs `python -m bnfold fold IN -o OUT` with its onnxruntime check and reports its
peak memory against the model's size (issue 11: at most 2.5x on the 1.07 GB MLP).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "benchmarks" / "out"
sys.path.insert(0, str(REPO / "benchmarks"))

_BARE = """
import os, sys, onnx
model = onnx.load(sys.argv[1])
onnx.save(model, sys.argv[2])
fd = os.open(sys.argv[2], os.O_RDONLY)
os.fsync(fd)
os.close(fd)
"""


def make_cnn(path: Path, *, channels: int = 1024, layers: int = 13, image: int = 32,
             seed: int = 0) -> Path:
    """A few wide 3x3 convolutions, each followed by BN and ReLU."""
    from onnx import TensorProto, helper

    from bench_fold import _save, _Tensors

    tensors = _Tensors(seed)
    nodes, x = [], "input"
    for i in range(layers):
        name, c_in = f"conv{i}", (3 if i == 0 else channels)
        w = tensors.weight(f"{name}.weight", (channels, c_in, 3, 3), c_in * 9)
        b = tensors.add(f"{name}.bias", tensors.rng.normal(0, 0.1, channels))
        nodes.append(helper.make_node("Conv", [x, w, b], [name], name=name, kernel_shape=[3, 3],
                                      pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("BatchNormalization",
                                      [name, *tensors.batch_norm(f"{name}.bn", channels)],
                                      [f"{name}.bn"], name=f"{name}.bn"))
        nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.relu"],
                                      name=f"{name}.relu"))
        x = f"{name}.relu"
    nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        nodes, "wide_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, image, image])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                       ["N", channels, image, image])],
        tensors.initializers)
    return _save(graph, path)


def make_mlp(path: Path, *, width: int = 4096, layers: int = 16, seed: int = 0) -> Path:
    """bench_fold.py's MLP, 16 layers: about 1.07 GB."""
    from bench_fold import make_mlp as bench_fold_mlp

    return bench_fold_mlp(path, width=width, layers=layers, features=width, seed=seed)


MODELS = {
    "cnn": (make_cnn, {}, dict(channels=128, layers=4)),
    "mlp": (make_mlp, {}, dict(width=512, layers=6)),
}


def _run(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident MB of `argv`, a fresh process."""
    os.sync()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{err.decode(errors='replace')[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def measure(name: str, small: bool, repeat: int, check: bool = False) -> dict:
    make, full, small_args = MODELS[name]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    src = OUT_DIR / f"large_{name}{'_small' if small else ''}.onnx"
    dst = src.with_name(src.stem + ".out.onnx")
    args = small_args if small else full
    # Generated in a child: the parent stays small, so the children's peaks are their own.
    subprocess.run([sys.executable, __file__, "--make", name, str(src), json.dumps(args)], check=True)
    size_mb = src.stat().st_size / 1e6  # decimal, as the figures
    commands = {
        "bare": [sys.executable, "-c", _BARE, str(src), str(dst)],
        "fold": [sys.executable, "-m", "bnfold", "fold", str(src), "-o", str(dst), "--no-verify",
                 "--quiet"],
    }
    if check:
        commands["check"] = [sys.executable, "-m", "bnfold", "fold", str(src), "-o", str(dst),
                             "--quiet"]
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
    try:
        for _ in range(repeat):
            for mode, argv in commands.items():
                dst.unlink(missing_ok=True)
                runs[mode].append(_run(argv))
    finally:
        for f in (src, dst):
            f.unlink(missing_ok=True)
    best = {mode: (min(s for s, _ in r), max(p for _, p in r)) for mode, r in runs.items()}
    return {"model": name, "size_mb": size_mb, **{f"{m}_s": v[0] for m, v in best.items()},
            **{f"{m}_peak_mb": v[1] for m, v in best.items()},
            "all": {m: [round(s, 2) for s, _ in r] for m, r in runs.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small models: a smoke run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=list(MODELS))
    parser.add_argument("--check", action="store_true",
                        help="also time `bnfold fold` with its check; peak memory vs model size")
    parser.add_argument("--make", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make:
        name, path, kwargs = args.make
        MODELS[name][0](Path(path), **json.loads(kwargs))
        return 0
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print(f"{'model':6} {'size':>8} {'bare s':>7} {'fold s':>7} {'ratio':>6} {'bare peak':>9} "
          f"{'fold peak':>9}  all runs (s)")
    for name in args.only or list(MODELS):
        r = measure(name, args.small, args.repeat, args.check)
        print(f"{name:6} {r['size_mb']:6.0f}MB {r['bare_s']:7.2f} {r['fold_s']:7.2f} "
              f"{r['fold_s'] / r['bare_s']:5.2f}x {r['bare_peak_mb']:7.0f}MB "
              f"{r['fold_peak_mb']:7.0f}MB  {r['all']}", flush=True)
        if args.check:  # sizes in MB of 10^6 bytes, peaks in MiB: the ratio in bytes
            ratio = r["check_peak_mb"] * 2**20 / (r["size_mb"] * 1e6)
            print(f"{'':6} with its check: {r['check_s']:.2f} s, peak {r['check_peak_mb']:.0f} MB"
                  f" = {ratio:.2f}x the model (target <= 2.5x)", flush=True)
    print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  (target: fold <= 1.3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
