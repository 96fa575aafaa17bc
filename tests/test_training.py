"""End to end with onnxruntime-training: a model built without batch norm -> `bnfold insert` ->
`bnfold artifacts` -> 300 steps of onnxruntime.training.api on a seeded synthetic 2-class task ->
the trained inference model exported -> `bnfold fold` removes every BN and verifies.

Marked `training`: onnxruntime-training replaces onnxruntime, so these run in their own
environment (README, "Train an inserted model"; `.ci/run` makes it), not in the main suite.
Every step runs the command line in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.training

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, LEARNING_RATE = 300, 64, 0.01
BN = "BatchNormalization"


@pytest.fixture(scope="module")
def api():
    return pytest.importorskip("onnxruntime.training.api")


def bnfold(*args, cwd=ROOT, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's bnfold, wherever cwd is
    done = subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env)
    if check:
        assert done.returncode == 0, done.stderr
    return done


# --------------------------------------------------------------------------- models and data

def _weight(rng, name: str, shape, fan_in: int) -> onnx.TensorProto:
    return numpy_helper.from_array(
        rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32), name)


def seed_mlp(seed: int = 0) -> onnx.ModelProto:
    """The seed MLP without BN: Dense 5->16 ReLU, Dense 16->32 ReLU, Dense 32->2 Softmax."""
    rng = np.random.default_rng(seed)
    nodes, inits, h = [], [], "x"
    for i, (k, n, act) in enumerate([(5, 16, "Relu"), (16, 32, "Relu"), (32, 2, None)], 1):
        name = f"dense_{i}"
        inits += [_weight(rng, f"{name}.weight", [n, k], k),
                  numpy_helper.from_array(np.zeros(n, np.float32), f"{name}.bias")]
        nodes.append(helper.make_node("Gemm", [h, f"{name}.weight", f"{name}.bias"],
                                      [f"{name}.out"], name=name, transB=1))
        h = f"{name}.out"
        if act:
            nodes.append(helper.make_node(act, [h], [f"{name}.relu"], name=f"{name}/relu"))
            h = f"{name}.relu"
    nodes.append(helper.make_node("Softmax", [h], ["y"], name="softmax", axis=-1))
    graph = helper.make_graph(
        nodes, "seed_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    """x[batch, 1, 8, 8] -> Conv 1->4 3x3 pad 1, ReLU -> Conv 4->8 3x3 stride 2, ReLU -> Flatten
    -> Gemm 72->2 -> Softmax."""
    rng = np.random.default_rng(seed)
    inits = [_weight(rng, "conv_1.weight", [4, 1, 3, 3], 9),
             numpy_helper.from_array(np.zeros(4, np.float32), "conv_1.bias"),
             _weight(rng, "conv_2.weight", [8, 4, 3, 3], 36),
             numpy_helper.from_array(np.zeros(8, np.float32), "conv_2.bias"),
             _weight(rng, "head.weight", [2, 72], 72),
             numpy_helper.from_array(np.zeros(2, np.float32), "head.bias")]
    nodes = [
        helper.make_node("Conv", ["x", "conv_1.weight", "conv_1.bias"], ["c1"], name="conv_1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="conv_1/relu"),
        helper.make_node("Conv", ["r1", "conv_2.weight", "conv_2.bias"], ["c2"], name="conv_2",
                         kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="conv_2/relu"),
        helper.make_node("Flatten", ["r2"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "head.weight", "head.bias"], ["logits"], name="head",
                         transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp_task(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two classes either side of a plane, with a margin: standard normal features, those within
    0.25 of the plane left out."""
    x = rng.normal(0, 1, (3 * n, 5))
    score = x @ np.array([1.0, -1.0, 0.5, 0.0, 0.25])
    x, score = x[np.abs(score) > 0.25][:n], score[np.abs(score) > 0.25][:n]
    return x.astype(np.float32), (score > 0).astype(np.int64)


def cnn_task(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bright horizontal (class 0) or vertical (class 1) bar at a random place, in noise."""
    labels = rng.integers(0, 2, n)
    x = rng.normal(0, 0.3, (n, 1, 8, 8))
    where = rng.integers(0, 8, n)
    for i in range(n):
        if labels[i]:
            x[i, 0, :, where[i]] += 1.5
        else:
            x[i, 0, where[i], :] += 1.5
    return x.astype(np.float32), labels.astype(np.int64)


# --------------------------------------------------------------------------- the loop

def batch_statistics(model: onnx.ModelProto, x: np.ndarray, bn: onnx.NodeProto):
    """Mean and population variance over a batch (every axis but 1) of a BN's input, as it is
    in training: every BN before it normalising with batch statistics."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.ir_version = min(probe.ir_version, 10)
    for node in probe.graph.node:
        if node.op_type == BN:
            node.attribute.append(helper.make_attribute("training_mode", 1))
            node.output.extend([f"{node.name}/probe.mean", f"{node.name}/probe.var"])
    probe.graph.output.append(helper.make_tensor_value_info(bn.input[0], TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    (value,) = session.run([bn.input[0]], {"x": x})
    axes = tuple(i for i in range(value.ndim) if i != 1)
    value = value.astype(np.float64)
    return value.mean(axis=axes), value.var(axis=axes)


def train_and_fold(api, tmp_path: Path, model: onnx.ModelProto, task, insert_args,
                   ir_version: int | None = None) -> dict:
    """The whole round trip; returns the measured figures."""
    import onnxruntime as ort

    plain = tmp_path / "plain.onnx"
    onnx.save(model, plain)
    inserted = tmp_path / "inserted.onnx"
    done = bnfold("insert", plain, "-o", inserted, *insert_args, "--json", tmp_path / "ins.json")
    insert_report = json.loads((tmp_path / "ins.json").read_text())
    if ir_version is not None:  # as a newer onnx writes it: the trainer reads IR 10 at most
        newer = onnx.load(inserted)
        newer.ir_version = ir_version
        onnx.save(newer, inserted)
    directory = tmp_path / "artifacts"
    bnfold("artifacts", inserted, "-o", directory, "--loss", "cross-entropy",
           "--json", tmp_path / "art.json")
    report = json.loads((tmp_path / "art.json").read_text())
    assert sorted(report["files"]) == sorted(p.name for p in directory.iterdir())
    assert set(report["state"]) == set(insert_report["state"])
    assert set(insert_report["trainable"]) <= set(report["trainable"])
    if ir_version is not None:
        assert report["ir_version"] == [ir_version, 10]

    inserted_model = onnx.load(inserted)
    momentum = {n.name: helper.get_node_attr_value(n, "momentum")
                for n in inserted_model.graph.node if n.op_type == BN}
    bns = [n for n in to_inference(inserted_model).graph.node if n.op_type == BN]
    state = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    module = api.Module(str(directory / "training_model.onnx"), state,
                        str(directory / "eval_model.onnx"))
    optimizer = api.Optimizer(str(directory / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(LEARNING_RATE)
    assert module.input_names() == report["inputs"]

    rng = np.random.default_rng(1)
    x_train, y_train = task(4096, rng)
    x_test, y_test = task(1000, rng)
    module.train()
    losses = []
    for step in range(STEPS):
        pick = rng.integers(0, len(x_train), BATCH)
        if step == 0:  # the first step's update of the running statistics, against numpy
            expected = {bn.name: batch_statistics(to_inference(inserted_model), x_train[pick], bn)
                        for bn in bns}
        losses.append(float(module(x_train[pick], y_train[pick])))
        if step == 0:
            first_error = 0.0
            for bn in bns:
                m = momentum[bn.name]
                mean, var = expected[bn.name]
                got_mean = state.parameters[bn.input[3]].data.astype(np.float64)
                got_var = state.parameters[bn.input[4]].data.astype(np.float64)
                first_error = max(first_error,
                                  np.abs(got_mean - (1 - m) * mean).max(),
                                  np.abs(got_var - (m + (1 - m) * var)).max())
        optimizer.step()
        module.lazy_reset_grad()
    figures = {"loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:])),
               "first_step_stats_error": float(first_error)}
    figures["loss_ratio"] = figures["loss_first"] / figures["loss_last"]

    saved = tmp_path / "trained.ckpt"
    api.CheckpointState.save_checkpoint(state, str(saved))
    reloaded = api.CheckpointState.load_checkpoint(str(saved))
    moved = []
    for name in report["state"]:
        value = reloaded.parameters[name].data.astype(np.float64)
        start = 0.0 if name in [bn.input[3] for bn in bns] else 1.0
        moved.append(float(np.abs(value - start).max()))
    figures["stats_moved_min"] = min(moved)

    module.eval()
    exported = tmp_path / "trained.onnx"
    module.export_model_for_inferencing(str(exported), report["outputs"])
    trained = onnx.load(exported)
    assert [o.name for o in trained.graph.output] == report["outputs"]
    assert sum(n.op_type == BN for n in trained.graph.node) == len(bns)
    exported_stats = {t.name: numpy_helper.to_array(t) for t in trained.graph.initializer}
    for name in report["state"]:  # the trained statistics are in the exported model
        np.testing.assert_array_equal(exported_stats[name], reloaded.parameters[name].data)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {"x": x_test})
    figures["accuracy"] = float((probabilities.argmax(1) == y_test).mean())

    folded = tmp_path / "folded.onnx"
    done = bnfold("fold", exported, "-o", folded, "--json", tmp_path / "fold.json")
    assert "verification passed" in done.stderr
    fold_report = json.loads((tmp_path / "fold.json").read_text())
    assert fold_report["folded"] == len(bns) and fold_report["kept"] == 0
    assert fold_report["verification"]["passed"]
    assert not any(n.op_type == BN for n in onnx.load(folded).graph.node)
    (output,) = fold_report["verification"]["outputs"]
    figures["fold_max_abs"], figures["fold_max_rel"] = output["max_abs"], output["max_rel"]
    session = ort.InferenceSession(str(folded), providers=["CPUExecutionProvider"])
    (folded_probabilities,) = session.run(None, {"x": x_test})
    figures["folded_accuracy"] = float((folded_probabilities.argmax(1) == y_test).mean())
    print(json.dumps(figures))
    return figures


def to_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    from bnfold.fold import to_inference_mode
    return to_inference_mode(model)


def assert_trained(figures: dict) -> None:
    assert figures["loss_ratio"] >= 5, figures
    assert figures["stats_moved_min"] > 0.05, figures  # every running mean/var left 0/1
    assert figures["first_step_stats_error"] < 1e-5, figures  # ONNX's update, as numpy has it
    assert figures["accuracy"] >= 0.95, figures
    assert figures["folded_accuracy"] == figures["accuracy"], figures


@pytest.mark.parametrize("form", ["inference", "training"])
def test_seed_mlp_trains_and_folds(api, tmp_path, form):
    args = ["--after", "dense_2"] + (["--training"] if form == "training" else [])
    figures = train_and_fold(api, tmp_path, seed_mlp(), mlp_task, args,
                             ir_version=11 if form == "inference" else None)
    assert_trained(figures)


def test_small_cnn_trains_and_folds(api, tmp_path):
    figures = train_and_fold(api, tmp_path, small_cnn(), cnn_task, ["--op", "Conv"])
    assert_trained(figures)


# --------------------------------------------------------------------------- the README


def readme_training_example() -> tuple[list[str], str]:
    """The README's "Train an inserted model" commands (bnfold ...) and its Python, verbatim."""
    section = (ROOT / "README.md").read_text().split("## Train an inserted model")[1]
    code = [line[4:] for line in section.split("\n## ")[0].splitlines()
            if line.startswith("    ") or not line.strip()]
    commands = [line for line in code if line.startswith("bnfold ")]
    start = next(i for i, line in enumerate(code) if line.startswith("from onnxruntime"))
    end = next(i for i, line in enumerate(code) if line.startswith("module.export"))
    return commands, textwrap.dedent("\n".join(code[start:end + 1]))


def test_readme_training_example_runs_as_written(api, tmp_path):
    commands, python = readme_training_example()
    onnx.save(seed_mlp(), tmp_path / "model.onnx")
    for command in commands[:2]:  # insert, artifacts
        bnfold(*shlex.split(command)[1:], cwd=tmp_path)
    rng = np.random.default_rng(5)
    x, labels = mlp_task(STEPS * BATCH, rng)
    batches = ((x[i:i + BATCH], labels[i:i + BATCH]) for i in range(0, len(x), BATCH))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(python, "README.md", "exec"), {"batches": batches})
    finally:
        os.chdir(cwd)
    done = bnfold(*shlex.split(commands[2])[1:], cwd=tmp_path)  # fold
    assert "verification passed" in done.stderr and "1 folded, 0 kept" in done.stderr
    import onnxruntime as ort

    x_test, y_test = mlp_task(1000, rng)
    session = ort.InferenceSession(str(tmp_path / "model.folded.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert (session.run(None, {"x": x_test})[0].argmax(1) == y_test).mean() >= 0.95


def test_artifacts_directory_handling(api, tmp_path):
    """A new DIR is created; a DIR that is not empty is refused unless --force, which replaces
    the artifacts and leaves other files; a failure in the trainer leaves nothing behind."""
    model = tmp_path / "model.bn.onnx"
    onnx.save(seed_mlp(), tmp_path / "model.onnx")
    bnfold("insert", tmp_path / "model.onnx", "-o", model, "--after", "dense_2", "-q")
    directory = tmp_path / "artifacts"
    bnfold("artifacts", model, "-o", directory, "--loss", "cross-entropy", "-q")
    written = {p.name: p.read_bytes() for p in directory.iterdir()}
    assert sorted(written) == sorted(["training_model.onnx", "eval_model.onnx",
                                      "optimizer_model.onnx", "checkpoint"])
    refused = bnfold("artifacts", model, "-o", directory, "--loss", "mse", check=False)
    assert refused.returncode == 2
    assert refused.stderr == f"bnfold: error: {directory}: not empty (--force replaces the " \
                             f"artifacts in it)\n"
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == written
    (directory / "notes.txt").write_text("mine")
    bnfold("artifacts", model, "-o", directory, "--loss", "mse", "--optimizer", "sgd",
           "--force", "-q")
    assert (directory / "notes.txt").read_text() == "mine"
    assert (directory / "eval_model.onnx").read_bytes() != written["eval_model.onnx"]

    # A layer the loss cannot differentiate through (Floor): onnxruntime refuses to build.
    broken = onnx.load(model)
    relu = next(n for n in broken.graph.node if n.name == "dense_1/relu")
    relu.op_type = "Floor"
    onnx.save(broken, tmp_path / "broken.onnx")
    failed = bnfold("artifacts", tmp_path / "broken.onnx", "-o", tmp_path / "never",
                    "--loss", "cross-entropy", check=False)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1, failed.stderr
    assert failed.stderr.startswith("bnfold: error: onnxruntime-training cannot build")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "artifacts", "broken.onnx", "model.bn.onnx", "model.onnx"]
