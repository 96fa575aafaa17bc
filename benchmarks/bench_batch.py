"""What a model repository saves by folding its models in one run instead of one run per model.

    python benchmarks/bench_batch.py              # the 6 models of models/, 4 copies each: 24
    python benchmarks/bench_batch.py --copies 1   # a smoke run: 6 models

Wall time (fastest of --repeat runs) of:

- startup:  `python -c "import bnfold.cli, onnxruntime"`: what every run pays before any work
- per-model: one `bnfold fold MODEL -o OUT/MODEL` process per model, one after another
- batch:     one `bnfold fold DIR --output-dir OUT` (all models in one interpreter)
- jobs 2:    the same with `--jobs 2` (two worker processes)

Every variant verifies with onnxruntime (the default) and writes through the commit protocol.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4, help="copies of each example model")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each variant (fastest)")
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory() as work:
        models = Path(work) / "models"
        models.mkdir()
        for source in sorted((ROOT / "models").glob("*.onnx")):
            for i in range(args.copies):
                shutil.copy(source, models / f"{source.stem}_{i}.onnx")
        files = sorted(models.iterdir())
        n = len(files)

        def fresh(name: str) -> Path:
            out = Path(work) / name
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            return out

        def per_model() -> float:
            out = fresh("out_each")
            return sum(timed([python, "-m", "bnfold", "fold", str(f), "-o", str(out / f.name),
                              "-q"]) for f in files)

        def batch(jobs: int) -> float:
            out = fresh(f"out_jobs{jobs}")
            return timed([python, "-m", "bnfold", "fold", str(models), "--output-dir", str(out),
                          "--jobs", str(jobs), "-q"])

        variants = {
            "startup": lambda: timed([python, "-c", "import bnfold.cli, onnxruntime"]),
            "per-model": per_model,
            "batch": lambda: batch(1),
            "jobs 2": lambda: batch(2),
        }
        results = {name: min(run() for _ in range(args.repeat)) for name, run in variants.items()}
    print(f"{n} models ({args.copies} copies of each of models/*.onnx), fastest of "
          f"{args.repeat} runs:")
    print("| variant | wall time | per model |")
    print("|---|---|---|")
    for name, took in results.items():
        per = "" if name == "startup" else f"{took / n:.2f} s"
        print(f"| {name} | {took:.2f} s | {per} |")


if __name__ == "__main__":
    main()
