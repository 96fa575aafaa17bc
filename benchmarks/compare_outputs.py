"""Do two versions of bnfold write the same models? Fold, insert and inspect with an older
bnfold (a git revision) and with this checkout, on the same models, and compare the results
byte for byte (models) and field for field (reports).

    python benchmarks/compare_outputs.py                  # against main
    python benchmarks/compare_outputs.py --old 3b1911c --random 200

The models: the example exports in models/, bench_passes.py's block models (small N), the test
builders' models (tests/builders.py, default arguments), and `--random` random graphs from the
property tests' generators (tests/test_fold_properties.py, tests/test_fold_affine_properties.py).
Each version runs in its own process with PYTHONPATH set to its copy of bnfold. Jobs: fold with
the defaults; fold with lower_standalone and training_to_inference; insert(all_layers=True);
inspect; each result model is compared as serialized in memory and as `bnfold.save` writes
it. An exception counts as a result (its type and message are compared).
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import inspect as pyinspect
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def generate(folder: Path, random_count: int, blocks: list[int]) -> int:
    """Write every model to compare into `folder`; the count."""
    count = 0

    def put(name: str, model: onnx.ModelProto) -> None:
        nonlocal count
        (folder / f"{name}.onnx").write_bytes(model.SerializeToString())
        count += 1

    for path in sorted((REPO / "models").glob("*.onnx")):
        put(f"models-{path.stem}", onnx.load(path))
    bench = _module(REPO / "benchmarks" / "bench_passes.py", "bench_passes")
    for variant, (make, _) in bench.VARIANTS.items():
        for n in blocks:
            put(f"bench-{variant}-{n}", make(n, 4))
    sys.path.insert(0, str(TESTS))
    builders = _module(TESTS / "builders.py", "builders")
    for name, function in vars(builders).items():
        if name.startswith("_") or not pyinspect.isfunction(function):
            continue
        if function.__module__ != "builders":
            continue
        parameters = pyinspect.signature(function).parameters.values()
        if any(p.default is p.empty and p.kind is not p.VAR_KEYWORD for p in parameters):
            continue
        try:
            model = function()
        except Exception:
            continue
        if isinstance(model, onnx.ModelProto):
            put(f"builder-{name}", model)
    for name, value in (("shared_output_consumer", dict(also="consumer")),
                        ("shared_output_graph_output", dict(also="output")),
                        ("shared_weights_both", dict(both_bn=True)),
                        ("shared_weights_one", dict(both_bn=False))):
        function = builders.conv_bn_shared_output if "output" in name else builders.shared_weight_convs
        try:
            put(f"builder-{name}", function(**value))
        except Exception:
            pass
    if random_count:
        from hypothesis import HealthCheck, given, settings

        for module_name in ("test_fold_properties", "test_fold_affine_properties"):
            module = _module(TESTS / f"{module_name}.py", module_name)
            drawn = []

            @settings(max_examples=random_count, database=None, deadline=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=module.random_models())
            def collect(case):
                drawn.append(case[0] if isinstance(case, tuple) else case)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                collect()
            for i, model in enumerate(drawn):
                if isinstance(model, onnx.ModelProto):
                    put(f"random-{module_name}-{i}", model)
    return count


def _child(models: Path, out: Path) -> None:
    """Run every job on every model with the bnfold on sys.path; write the results to `out`."""
    from bnfold.fold import fold
    from bnfold.insert import insert
    from bnfold.inspect import inspect
    from bnfold.io import save

    def fold_default(model):
        return fold(model)

    def fold_options(model):
        return fold(model, lower_standalone=True, training_to_inference=True)

    def insert_all(model):
        return insert(model, all_layers=True)

    def inspect_only(model):
        return None, inspect(model)

    jobs = {"fold": fold_default, "fold-options": fold_options, "insert": insert_all,
            "inspect": inspect_only}
    for path in sorted(models.glob("*.onnx")):
        for job, run in jobs.items():
            model = onnx.load(path)
            stem = f"{out / path.stem}.{job}"
            try:
                result, report = run(model)
            except Exception as err:  # a failure is a result too
                Path(stem + ".json").write_text(json.dumps({"error": type(err).__name__,
                                                                 "message": str(err)}))
                continue
            data = report.to_dict()
            data.pop("verification", None)  # seeded but timing-free; drop to be safe anyway
            Path(stem + ".json").write_text(json.dumps(data, sort_keys=True, default=str))
            if result is not None:
                Path(stem + ".onnx").write_bytes(result.SerializeToString())
                save(result, stem + ".saved.onnx")  # bnfold's own writer, byte for byte
            if model.SerializeToString() != onnx.load(path).SerializeToString():
                Path(stem + ".mutated").write_text("the input model was modified")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="main", help="git revision of the older bnfold")
    parser.add_argument("--random", type=int, default=100, help="random graphs per generator")
    parser.add_argument("--blocks", nargs="+", type=int, default=[3, 60])
    parser.add_argument("--child", nargs=2, metavar=("MODELS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(Path(args.child[0]), Path(args.child[1]))
        return 0
    with tempfile.TemporaryDirectory(prefix="bnfold-compare-") as tmp:
        tmp = Path(tmp)
        models, old_src = tmp / "models", tmp / "old"
        for folder in (models, old_src, tmp / "out-old", tmp / "out-new"):
            folder.mkdir()
        count = generate(models, args.random, args.blocks)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.old, "bnfold"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive, check=True)
        for label, source in (("old", old_src), ("new", REPO)):
            env = {**os.environ, "PYTHONPATH": str(source)}
            subprocess.run([sys.executable, __file__, "--child", str(models), str(tmp / f"out-{label}")],
                           check=True, env=env)
        old_files = sorted(p.name for p in (tmp / "out-old").iterdir())
        new_files = sorted(p.name for p in (tmp / "out-new").iterdir())
        differ = sorted(set(old_files) ^ set(new_files))
        _, mismatch, errors = filecmp.cmpfiles(tmp / "out-old", tmp / "out-new",
                                               sorted(set(old_files) & set(new_files)), shallow=False)
        differ += mismatch + errors
        print(f"{count} models, {len(old_files)} results from {args.old}, {len(new_files)} from "
              f"this checkout: {len(differ)} differ")
        for name in differ:
            print(f"  differs: {name}")
        return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
