"""Graphs of thousands of blocks: fold and insert finish, and their work grows like the graph.

Each pass used to cost the square of the node count (a node removed from the protobuf list one
at a time, the graph re-indexed and every reader renamed per rewrite): 3000 blocks took minutes.
The figures (time against a bare load + save) are benchmarks/bench_passes.py's; here, every
batch norm must fold exactly, and the count of node visits must grow linearly.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold.fold
import bnfold.graph
import bnfold.nodes
import bnfold.rules.chains
from bnfold.fold import fold
from bnfold.insert import insert

C = 4
F = TensorProto.FLOAT
_fold_module = __import__("sys").modules["bnfold.fold"]  # (`bnfold.fold` is the function)


class _Blocks:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.bn_params: dict[str, dict[str, np.ndarray]] = {}

    def const(self, name: str, array) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def bn(self, x: str, name: str) -> str:
        u = lambda lo, hi: self.rng.uniform(lo, hi, C).astype(np.float32)
        params = dict(scale=u(0.5, 1.5), bias=u(-0.5, 0.5), mean=u(-1, 1), var=u(0.3, 3))
        self.bn_params[name] = params
        return self.node("BatchNormalization",
                         [x] + [self.const(f"{name}.{k}", v) for k, v in params.items()], name)

    def cast(self, x: str, name: str) -> str:
        return self.node("Cast", [x], name, to=F)

    def model(self, shape: list) -> onnx.ModelProto:
        out = self.nodes[-1].output[0]
        graph = helper.make_graph(self.nodes, "blocks", [helper.make_tensor_value_info("x", F, shape)],
                                  [helper.make_tensor_value_info(out, F, shape)], self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv_blocks(n: int) -> tuple[onnx.ModelProto, _Blocks]:
    b, x = _Blocks(), "x"
    for i in range(n):
        w = b.const(f"c{i}.w", b.rng.normal(0, 0.3, (C, C, 3, 3)))
        y = b.node("Conv", [x, w, b.const(f"c{i}.b", b.rng.normal(0, 0.1, C))], f"c{i}",
                   kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        x = b.node("Relu", [b.bn(y, f"c{i}.bn")], f"c{i}.relu")
    return b.model(["N", C, 5, 5]), b


def keras_blocks(n: int) -> onnx.ModelProto:
    """Keras 3 style: a no-op Cast around every layer, MatMul + bias Add Dense layers."""
    b, x = _Blocks(), "x"
    for i in range(n):
        x = b.cast(x, f"d{i}.cast_in")
        y = b.node("MatMul", [x, b.cast(b.const(f"d{i}.w", b.rng.normal(0, 0.5, (C, C))),
                                        f"d{i}.cast_w")], f"d{i}.mm")
        y = b.cast(b.node("Add", [b.cast(y, f"d{i}.cast_mm"), b.const(f"d{i}.b", np.zeros(C))],
                          f"d{i}.add"), f"d{i}.cast_add")
        x = b.cast(b.node("Relu", [b.cast(b.bn(y, f"d{i}.bn"), f"d{i}.cast_bn")], f"d{i}.relu"),
                   f"d{i}.cast_relu")
    return b.model(["N", C])


def matmul_blocks(n: int) -> onnx.ModelProto:
    """Dense(use_bias=False) -> BN: every fold adds a bias Add after its MatMul."""
    b, x = _Blocks(), "x"
    for i in range(n):
        y = b.node("MatMul", [x, b.const(f"m{i}.w", b.rng.normal(0, 0.5, (C, C)))], f"m{i}")
        x = b.node("Relu", [b.bn(y, f"m{i}.bn")], f"m{i}.relu")
    return b.model(["N", C])


def dense_blocks(n: int) -> onnx.ModelProto:
    b, x = _Blocks(), "x"
    for i in range(n):
        y = b.node("Gemm", [x, b.const(f"g{i}.w", b.rng.normal(0, 0.5, (C, C))),
                            b.const(f"g{i}.b", np.zeros(C))], f"g{i}", transB=1)
        x = b.node("Relu", [y], f"g{i}.relu")
    return b.model(["N", C])


def ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def test_fold_of_3000_conv_blocks_folds_every_bn_exactly():
    model, blocks = conv_blocks(3000)
    folded, report = fold(model)
    assert len(report.folded) == 3000 and not report.kept
    assert ops(folded) == {"Conv": 3000, "Relu": 3000}
    onnx.checker.check_model(folded)
    weights = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for i in (0, 1, 1234, 2999):  # the first of each scan's folds, and some others
        p = {k: v.astype(np.float64) for k, v in blocks.bn_params[f"c{i}.bn"].items()}
        s = p["scale"] / np.sqrt(p["var"] + np.float32(1e-5))
        conv = folded.graph.node[2 * i]
        assert conv.name == f"c{i}" and conv.output[0] == f"c{i}.bn"
        w, b = weights[conv.input[1]], weights[conv.input[2]]
        expected_w = (originals[f"c{i}.w"] * s[:, None, None, None]).astype(np.float32)
        expected_b = ((originals[f"c{i}.b"] - p["mean"]) * s + p["bias"]).astype(np.float32)
        np.testing.assert_array_equal(w, expected_w)
        np.testing.assert_array_equal(b, expected_b)
    assert len(folded.graph.initializer) == 2 * 3000  # every BN parameter collected


def test_fold_of_2000_keras_style_layers_removes_every_noop_cast_and_folds_every_bn():
    model = keras_blocks(2000)
    folded, report = fold(model)
    assert report.removed_casts == 6 * 2000 - 1  # the last makes the graph output: it stays
    assert len(report.folded) == 2000 and not report.kept
    assert ops(folded) == {"MatMul": 2000, "Add": 2000, "Relu": 2000, "Cast": 1}
    onnx.checker.check_model(folded)


def test_fold_of_2000_matmuls_without_bias_puts_each_new_add_right_after_its_matmul():
    folded, report = fold(matmul_blocks(2000))
    assert len(report.folded) == 2000 and not report.kept
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add", "Relu"] * 2000
    for i in range(0, 6000, 3):
        assert folded.graph.node[i + 1].input[0] == folded.graph.node[i].output[0]
    onnx.checker.check_model(folded)


def test_insert_after_3000_dense_layers_inserts_every_bn_after_its_activation():
    model, report = insert(dense_blocks(3000), all_layers=True)
    assert len(report.insertions) == 3000
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Relu", "BatchNormalization"] * 3000
    for i in range(3, 9000, 3):  # each Gemm reads the BN before it
        assert model.graph.node[i].input[0] == model.graph.node[i - 1].output[0]
    onnx.checker.check_model(model)


@pytest.fixture
def node_visits(monkeypatch):
    """Counts the nodes the passes look into for subgraphs: every walk of a graph does."""
    count = collections.Counter()
    original = bnfold.nodes.subgraphs

    def counted(node):
        count["visits"] += 1
        return original(node)

    for module in (bnfold.nodes, bnfold.graph, _fold_module, bnfold.rules.chains):
        monkeypatch.setattr(module, "subgraphs", counted)
    return count


@pytest.mark.parametrize("make, run", [
    (lambda n: conv_blocks(n)[0], fold),
    (keras_blocks, fold),
    (matmul_blocks, fold),
    (dense_blocks, lambda m: insert(m, all_layers=True)),
], ids=["fold-conv", "fold-keras-casts", "fold-matmul-no-bias", "insert-all"])
def test_node_visits_grow_linearly_with_the_graph(node_visits, make, run):
    visits = []
    for n in (100, 400):
        model = make(n)
        node_visits.clear()
        run(model)
        visits.append(node_visits["visits"])
    assert visits[1] <= 4.5 * visits[0], visits  # quadratic passes made it 16x
