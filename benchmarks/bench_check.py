"""Cost of the default check: `bnfold fold` against `bnfold fold --no-verify`, time and peak memory.

    python benchmarks/bench_check.py                    # all models below, 2 repeats
    python benchmarks/bench_check.py --models bench     # only the onnx.helper ResNet-50
    python benchmarks/bench_check.py --repeat 1 --keep  # leave the models in benchmarks/out/

Models (generated, seeded):
- bench:        benchmarks/bench_fold.py's ResNet-50-sized CNN (53 BN, [N, 3, 224, 224])
- torch:        a torchvision-layout ResNet-50 (tests/torch_models.py, width 64, 1000 classes,
                224x224) exported by TorchScript without constant folding (every BN kept),
                statistics measured on random batches and perturbed
- torch-dynamo: the same module exported by dynamo (optimize=False)

Every measurement runs the CLI in a fresh Python process; its time is measured inside that
process from before `import bnfold` to the end of the command (the interpreter start is left
out), its peak memory is that process's VmHWM from /proc/self/status at the end. The report's
JSON says which criterion decided and which reference ran.

`--force-reference` also measures the check with the float64 reference always built and run, as
for a fold that is not within 8 ulps of the original (the figures a user of such a model sees).

Target (issue 7): fold with the default check within 2x `fold --no-verify`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "benchmarks" / "out"

_CHILD = r"""
import json, os, resource, sys, time
start = time.perf_counter()
from bnfold.cli import main
if os.environ.get("BENCH_FORCE_REFERENCE"):  # the worst case: never "close", always R
    import importlib
    criterion = importlib.import_module("bnfold.verify.criterion")
    criterion._close = lambda a, b: False
try:
    main(sys.argv[1:], standalone_mode=False)
    code = 0
except SystemExit as exit:
    code = exit.code
elapsed = time.perf_counter() - start
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": elapsed, "cpu": usage.ru_utime + usage.ru_stime,
                  "peak_mb": hwm / 1024, "exit": code}), file=sys.stderr)
"""


def make_models(which: list[str], folder: Path) -> dict[str, Path]:
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    paths = {}
    if "bench" in which:
        from benchmarks.bench_fold import make_resnet50
        paths["bench"] = make_resnet50(folder / "bench_resnet50.onnx")
    torch_kinds = [w for w in which if w.startswith("torch")]
    if torch_kinds:
        import torch_models
        module = torch_models.with_statistics(torch_models.resnet50(), 224, seed=0, batches=1)
        for kind in torch_kinds:
            exporter = "dynamo" if kind == "torch-dynamo" else "torchscript"
            path = folder / f"{kind}_resnet50.onnx"
            torch_models.export(module, 224, path, exporter)
            paths[kind] = path
    return paths


def measure(model: Path, no_verify: bool, folder: Path, force: bool = False) -> dict:
    out, report = folder / "out.onnx", folder / "report.json"
    args = ["fold", str(model), "-o", str(out), "-q", "--json", str(report)]
    if no_verify:
        args.append("--no-verify")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if force:
        env["BENCH_FORCE_REFERENCE"] = "1"
    done = subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True,
                          text=True, check=False)
    result = json.loads(done.stderr.strip().splitlines()[-1])
    if not no_verify:
        verification = json.loads(report.read_text())["verification"]
        result["reference"] = verification["reference"]
        result["criteria"] = sorted({o["criterion"] for o in verification["outputs"]})
        result["passed"] = verification["passed"]
    out.unlink(missing_ok=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bench", "torch", "torch-dynamo"],
                        choices=["bench", "torch", "torch-dynamo"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--force-reference", action="store_true",
                        help="also measure the check with the float64 reference always run "
                             "(as when a fold is not within 8 ulps)")
    args = parser.parse_args(argv)
    OUT_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT_DIR) as tmp:
        folder = OUT_DIR if args.keep else Path(tmp)
        models = make_models(args.models, folder)
        print("| model | check | fold --no-verify | fold with the check | ratio (wall, cpu) | "
              "peak memory | criterion; reference |")
        print("|---|---|---|---|---|---|---|")
        for name, path in models.items():
            bare = [measure(path, True, Path(tmp)) for _ in range(args.repeat)]
            variants = [("default", False)] + ([("R forced", True)] if args.force_reference
                                                else [])
            for label, force in variants:
                checked = [measure(path, False, Path(tmp), force) for _ in range(args.repeat)]
                assert all(r["exit"] == 0 for r in bare + checked), bare + checked
                b = min(r["seconds"] for r in bare)
                c = min(r["seconds"] for r in checked)
                b_cpu = min(r["cpu"] for r in bare)
                c_cpu = min(r["cpu"] for r in checked)
                last = checked[-1]
                print(f"| {name} | {label} | {b:.2f} s | {c:.2f} s | {c / b:.2f}x, "
                      f"{c_cpu / b_cpu:.2f}x | {max(r['peak_mb'] for r in bare):.0f} MB -> "
                      f"{max(r['peak_mb'] for r in checked):.0f} MB | "
                      f"{', '.join(last['criteria'])}; {last['reference']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
