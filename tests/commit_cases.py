"""Scenes for the commit-protocol tests (tests/test_commit.py, tests/test_signals.py): a
folder with an input model (and data file), maybe an older output, and the command that
writes over it; and the check that, whatever happened, every path holds a complete model,
old or new, that computes what it should with its data.

Models: x[N, 8, 5, 5] -> Conv (16 channels, a 4.6 KB weight: it stays in the data file) -> BN;
`seed` makes different weights, so an old output and a new one compute different things.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from builders import trained_bn_params

X = np.random.default_rng(7).standard_normal((2, 8, 5, 5)).astype(np.float32)


def conv_bn(seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    params = trained_bn_params(16, rng)
    inits = [numpy_helper.from_array(rng.normal(size=(16, 8, 3, 3)).astype(np.float32), "W")]
    inits += [numpy_helper.from_array(v.astype(np.float32), f"bn.{k}") for k, v in params.items()]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean",
                                                     "bn.var"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", 1, ["N", 8, 5, 5])],
                              [helper.make_tensor_value_info("y", 1, ["N", 16, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save_model(model: onnx.ModelProto, path, data: str | None = None) -> None:
    """onnx's own save: one file, or every tensor in the data file `data` beside it."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if data is None:
        onnx.save(copy, str(path))
    else:
        onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data, size_threshold=0)


def expected(seed: int) -> np.ndarray:
    return run(conv_bn(seed))


def run(model) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(
        None, {"x": X})[0]


# case: (files to make: name -> (seed, data file name or None), the command's arguments after
# `bnfold fold`, the model path that is written, its seed before and after, the input's files)
CASES = {
    "in place, external data": ({"m.onnx": (0, "weights.bin")}, ["m.onnx", "--in-place"],
                                "m.onnx", 0, 0, []),
    "over an output with external data": (
        {"in.onnx": (0, "in.onnx.data"), "out.onnx": (1, "out.onnx.data")},
        ["in.onnx", "-o", "out.onnx"], "out.onnx", 1, 0, ["in.onnx", "in.onnx.data"]),
    "over a single-file output": ({"in.onnx": (0, None), "out.onnx": (1, None)},
                                  ["in.onnx", "-o", "out.onnx"], "out.onnx", 1, 0, ["in.onnx"]),
    "over a small single-file output": ({"in.onnx": (0, None), "out.onnx": (1, None)},
                                        ["in.onnx", "-o", "out.onnx"], "out.onnx", 1, 0,
                                        ["in.onnx"]),
}

# The new weights of a model in memory wait in a scratch file in the output's folder when the
# model is large (`bnfold.cli.fold._SPILL_ABOVE`), and stay in memory when it is small. These
# models are small: every case but the one named small runs as a large model would.
IN_MEMORY = {"over a small single-file output"}


def spill_above(case: str) -> int | None:
    """What `bnfold.cli.fold._SPILL_ABOVE` is set to for the case: -1, every model spills (as a
    large one does); None, the CLI's own limit (see IN_MEMORY)."""
    return None if case in IN_MEMORY else -1


def make(case: str, directory) -> list[str]:
    """Lay out `case` in `directory`; return the fold command's arguments (absolute paths)."""
    files, args, *_ = CASES[case]
    os.makedirs(directory, exist_ok=True)
    for name, (seed, data) in files.items():
        save_model(conv_bn(seed), os.path.join(directory, name), data)
    return [os.path.join(directory, a) if a.endswith(".onnx") else a for a in args]


def digest(directory, names) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(directory, n), "rb").read()).hexdigest()
            for n in names}


_FOLDER = re.compile(r"\.bnfold-[a-z0-9_]{8}")
_TMP = re.compile(r".+\.bnfold-[a-z0-9_]{8}")


def leftovers(directory) -> tuple[list[str], list[str]]:
    """The temporary folders, and the temporary data files, in `directory`."""
    names = sorted(os.listdir(directory))
    return [n for n in names if _FOLDER.fullmatch(n)], [n for n in names if _TMP.fullmatch(n)]


def check_consistent(case: str, directory, before_inputs: dict[str, str]) -> str:
    """Assert that the written path holds a complete model, old or new, that computes the
    output of its own weights, and that the input's files are as they were; return "old" or
    "new"."""
    files, _, written, old_seed, new_seed, inputs = CASES[case]
    path = os.path.join(directory, written)
    assert digest(directory, inputs) == before_inputs, "the input changed"
    model = onnx.load(path)  # with its external data: a missing or short file fails here
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    got = run(path)
    state = "old" if ops == ["Conv", "BatchNormalization"] else "new"
    assert ops in (["Conv", "BatchNormalization"], ["Conv"]), ops
    want = expected(old_seed if state == "old" else new_seed)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4,
                               err_msg=f"{state} model does not compute its own output")
    if state == "old":  # the old model is the old file, byte for byte, with its data
        seed, data = files[written]
        reference = tempfile.mkdtemp()
        try:
            save_model(conv_bn(seed), os.path.join(reference, written), data)
            names = [written] + ([data] if data else [])
            assert digest(directory, names) == digest(reference, names)
        finally:
            shutil.rmtree(reference)
    return state
