"""Constants computed by node chains (`bnfold.constants`), checked against onnxruntime.

Each builder writes the chain the way torch's dynamo exporter does (optimize=False), feeding a BN,
and each value is compared with what onnxruntime computes for the same tensor: the part of the
model that computes it, run on random inputs, with every graph optimization disabled.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from bnfold import constants
from bnfold.constants import computed_constant, computed_nodes
from bnfold.graph import GraphView, NameAllocator, infer_shapes
from builders import NP_DTYPE, GraphBuilder, random_feeds, run_unoptimised

DTYPES = ("fp32", "fp16", "fp64")
OPSETS = (15, 17, 21)


def make_view(model: onnx.ModelProto) -> GraphView:
    """The view the fold pass builds for the main graph."""
    shapes, types = infer_shapes(model)
    return GraphView(model, model.graph, outer=None, base_dir=None,
                     allow_initializer_inputs=False, shapes=shapes, types=types,
                     names=NameAllocator(model))


def onnxruntime_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    """`name` as onnxruntime computes it: the model cut down to the nodes `name` depends on."""
    producers = {o: node for node in model.graph.node for o in node.output}
    needed, stack = set(), [name]
    while stack:
        node = producers.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(node.input)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    info = next(v for v in list(inferred.value_info) + list(inferred.output) if v.name == name)
    graph = helper.make_graph([n for n in model.graph.node if id(n) in needed], "ref",
                              list(model.graph.input), [info], list(model.graph.initializer))
    ref = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return run_unoptimised(ref, random_feeds(ref))[name]


def assert_same_as_onnxruntime(model: onnx.ModelProto, name: str) -> np.ndarray:
    value = computed_constant(make_view(model), name)
    assert value is not None
    expected = onnxruntime_value(model, name)
    assert value.dtype == expected.dtype and value.shape == expected.shape
    np.testing.assert_array_equal(value, expected)
    return value


# ----------------------------------------------------------------------------- builders


def conv_zero_bias(dtype: str = "fp32", opset: int = 17) -> onnx.ModelProto:
    """Conv(bias=False) -> BN: bias = Expand(CastLike(0, x), Expand(Shape(W, 0, 1), [1]))."""
    b = GraphBuilder(dtype, opset=opset)
    x = b.input("x", ["batch", 4, 11])
    w = b.weight("w", (4, 1, 3))
    rows = b.node("Shape", [w], name="w_rows", start=0, end=1)
    one = b.const("one", np.array([1], np.int64), as_node=True)
    shape = b.node("Expand", [rows, one], name="bias_shape")
    zero = b.const("zero", np.array(0.0, np.float32), as_node=True)
    typed = b.node("CastLike", [zero, x], name="zero_like_x")
    bias = b.node("Expand", [typed, shape], name="bias")
    y = b.node("Conv", [x, w, bias], name="conv", group=4, kernel_shape=[3])
    b.output(b.bn(y, 4, name="bn", out="y"))
    return b.build()


def bn_without_affine(dtype: str = "fp32", opset: int = 17) -> onnx.ModelProto:
    """BatchNorm(affine=False) on a computed y:
    scale, bias = Expand(CastLike(1 or 0, y), Shape(y, start=1, end=2))."""
    b = GraphBuilder(dtype, opset=opset)
    x = b.input("x", ["batch", 4, 11])
    y = b.node("Relu", [x], name="relu")
    params = []
    for key, fill in (("scale", 1.0), ("bias", 0.0)):
        value = b.const(f"{key}_value", np.array([fill], np.float32), as_node=True)
        typed = b.node("CastLike", [value, y], name=f"{key}_like_y")
        channels = b.node("Shape", [y], name=f"{key}_channels", start=1, end=2)
        params.append(b.node("Expand", [typed, channels], name=key))
    mean = b.const("mean", np.zeros(4, NP_DTYPE[dtype]))
    var = b.const("var", np.ones(4, NP_DTYPE[dtype]))
    b.nodes.append(helper.make_node("BatchNormalization", [y, *params, mean, var], ["out"],
                                    name="bn"))
    b.output("out")
    return b.build()


def chain(nodes: list[onnx.NodeProto], output: str, *, opset: int = 17,
          initializers=(), shape=("batch", 4, 11)) -> onnx.ModelProto:
    """A model of `nodes` over a float input x of `shape` and `initializers`, output `output`."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    tensors = [onnx.numpy_helper.from_array(np.asarray(a), n) for n, a in initializers]
    model = helper.make_model(helper.make_graph(nodes, "chain", [x], [], tensors),
                              opset_imports=[helper.make_opsetid("", opset)])
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.output.extend(v for v in inferred.graph.value_info if v.name == output)
    return model


def const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(
        np.asarray(value), name))


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_zero_bias_matches_onnxruntime(dtype, opset):
    value = assert_same_as_onnxruntime(conv_zero_bias(dtype, opset), "bias_out")
    assert value.dtype == NP_DTYPE[dtype] and value.shape == (4,) and not value.any()


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_without_affine_parameters_match_onnxruntime(dtype, opset):
    model = bn_without_affine(dtype, opset)
    scale = assert_same_as_onnxruntime(model, "scale_out")
    bias = assert_same_as_onnxruntime(model, "bias_out")
    np.testing.assert_array_equal(scale, np.ones(4, NP_DTYPE[dtype]))
    np.testing.assert_array_equal(bias, np.zeros(4, NP_DTYPE[dtype]))


def test_computed_nodes_are_the_chain_in_evaluation_order():
    model = conv_zero_bias()
    nodes = computed_nodes(make_view(model), "bias_out")
    assert Counter(n.op_type for n in nodes) == Counter(
        {"Constant": 2, "CastLike": 1, "Shape": 1, "Expand": 2})
    assert nodes[-1].name == "bias"
    produced = {"x", "w"}
    for node in nodes:  # every input is produced earlier in the list, or is x (type only) or w
        assert all(i in produced for i in node.input)
        produced.update(node.output)
    assert computed_nodes(make_view(model), "y") == []


SHAPE_ARITHMETIC = {  # output, nodes over x [batch, 4, 11] and w [4, 1, 3]
    "gather_concat_reshape": ("r", [
        helper.make_node("Shape", ["w"], ["s"]),
        const("i", np.array(0, np.int64)),
        helper.make_node("Gather", ["s", "i"], ["c"]),
        const("ax", np.array([0], np.int64)),
        helper.make_node("Unsqueeze", ["c", "ax"], ["c1"]),
        const("minus1", np.array([-1], np.int64)),
        helper.make_node("Concat", ["c1", "minus1"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["w", "new_shape"], ["r"]),
    ]),
    "size_range_arithmetic": ("out", [
        helper.make_node("Size", ["w"], ["n"]),
        const("zero", np.array(0, np.int64)),
        const("step", np.array(2, np.int64)),
        helper.make_node("Range", ["zero", "n", "step"], ["r"]),
        helper.make_node("Cast", ["r"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Sqrt", ["f"], ["sq"]),
        helper.make_node("Reciprocal", ["sq"], ["inv"]),
        helper.make_node("Neg", ["inv"], ["neg"]),
        helper.make_node("Max", ["neg", "f"], ["out"]),
    ]),
    "where_pow_slice_transpose": ("out", [
        helper.make_node("Shape", ["x"], ["s"], start=-2),
        helper.make_node("ConstantOfShape", ["s"], ["filled"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [3.0])),
        helper.make_node("Transpose", ["filled"], ["t"], perm=[1, 0]),
        const("lo", np.array([1])), const("hi", np.array([2])), const("ax", np.array([0])),
        helper.make_node("Slice", ["t", "lo", "hi", "ax"], ["sl"]),
        const("half", np.array(0.5, np.float32)),
        helper.make_node("Pow", ["sl", "half"], ["p"]),
        helper.make_node("Equal", ["p", "sl"], ["eq"]),
        helper.make_node("Div", ["p", "sl"], ["d"]),
        helper.make_node("Where", ["eq", "d", "p"], ["wh"]),
        helper.make_node("Squeeze", ["wh", "ax"], ["sq"]),
        helper.make_node("Sub", ["sq", "half"], ["z"]),
        helper.make_node("Min", ["z", "sq"], ["m"]),
        helper.make_node("Mul", ["m", "sq"], ["mm"]),
        helper.make_node("Add", ["mm", "sq"], ["a"]),
        helper.make_node("Identity", ["a"], ["out"]),
    ]),
}


@pytest.mark.parametrize("case", sorted(SHAPE_ARITHMETIC))
def test_shape_arithmetic_matches_onnxruntime(case):
    output, nodes = SHAPE_ARITHMETIC[case]
    nodes = sorted(nodes, key=lambda n: n.op_type != "Constant")  # Constants first: topological
    w = np.random.default_rng(0).uniform(0.5, 2.0, (4, 1, 3)).astype(np.float32)
    model = chain(nodes, output, initializers=[("w", w)])
    onnx.checker.check_model(model, full_check=True)
    assert_same_as_onnxruntime(model, output)
    outputs = [n.output[0] for n in computed_nodes(make_view(model), output)]
    assert len(outputs) == len(set(outputs)) == len(nodes)  # each node once, though read often


@pytest.mark.parametrize("opset", (11, 13))
def test_evaluates_at_the_models_opset(opset):
    """Unsqueeze takes its axes as an attribute before opset 13, as an input from 13 on."""
    nodes = [helper.make_node("Shape", ["x"], ["s"])]
    if opset < 13:
        nodes.append(helper.make_node("Unsqueeze", ["s"], ["u"], axes=[0]))
    else:
        nodes += [const("ax", np.array([0], np.int64)),
                  helper.make_node("Unsqueeze", ["s", "ax"], ["u"])]
    model = chain(nodes, "u", opset=opset, shape=(2, 4, 11))
    value = assert_same_as_onnxruntime(model, "u")
    np.testing.assert_array_equal(value, [[2, 4, 11]])


# ----------------------------------------------------------------------------- refusals


def test_nodes_in_the_explicit_ai_onnx_domain_are_evaluated():
    model = conv_zero_bias()
    for node in model.graph.node:
        node.domain = "ai.onnx"
    model.opset_import.append(helper.make_opsetid("ai.onnx", 17))
    np.testing.assert_array_equal(computed_constant(make_view(model), "bias_out"), np.zeros(4))


def test_chain_reading_input_values_is_not_constant():
    nodes = [const("two", np.array(2.0, np.float32)), helper.make_node("Mul", ["x", "two"], ["y"]),
             helper.make_node("Shape", ["x"], ["s"], start=1, end=2),
             helper.make_node("Expand", ["y", "s"], ["e"])]
    model = chain(nodes, "e", shape=(1, 4, 1))
    view = make_view(model)
    assert computed_constant(view, "e") is None and computed_nodes(view, "e") == []
    assert computed_constant(view, "x") is None
    assert computed_constant(view, "s") is not None  # the shape alone is static


def test_castlike_first_input_is_read_for_its_values():
    nodes = [const("w", np.ones(4, np.float16)), helper.make_node("CastLike", ["x", "w"], ["c"])]
    model = chain(nodes, "c", shape=(4,))
    assert computed_constant(make_view(model), "c") is None


def test_ops_outside_the_set_are_not_evaluated():
    nodes = [const("c", np.array([-1.0, 2.0], np.float32)), helper.make_node("Relu", ["c"], ["r"])]
    assert computed_constant(make_view(chain(nodes, "r")), "r") is None


@pytest.mark.parametrize("start, end", [(0, 1), (0, None), (-3, -2)])
def test_shape_reading_a_symbolic_dim_is_not_constant(start, end):
    attrs = {"start": start} | ({} if end is None else {"end": end})
    model = chain([helper.make_node("Shape", ["x"], ["s"], **attrs)], "s")
    assert computed_constant(make_view(model), "s") is None
    size = chain([helper.make_node("Size", ["x"], ["n"])], "n")
    assert computed_constant(make_view(size), "n") is None


def test_initializer_also_listed_as_input_is_not_constant():
    model = conv_zero_bias()
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 1, 3]))
    view = make_view(model)
    assert computed_constant(view, "w") is None
    assert computed_constant(view, "bias_out") is not None  # reads only w's static shape


def test_chains_longer_than_the_limit_are_not_followed():
    nodes = [const("c0", np.array([1.5], np.float32))]
    nodes += [helper.make_node("Neg", [f"c{i}"], [f"c{i + 1}"]) for i in range(10)]
    view = make_view(chain(nodes, "c10"))
    assert computed_constant(view, "c10", limit=9) is None
    np.testing.assert_array_equal(computed_constant(view, "c10", limit=10), [1.5])


@pytest.mark.parametrize("builder", ["expand", "constant_of_shape", "range", "broadcast", "gather"])
def test_results_over_the_size_limit_are_refused_before_evaluation(builder):
    side = 4097  # side * side > 16M elements: never materialised
    nodes = {
        "expand": [const("z", np.array(0.0, np.float32)), const("s", np.array([side, side])),
                   helper.make_node("Expand", ["z", "s"], ["out"])],
        "constant_of_shape": [const("s", np.array([side, side])),
                              helper.make_node("ConstantOfShape", ["s"], ["out"])],
        "range": [const("a", np.array(0)), const("b", np.array(side * side)),
                  const("d", np.array(1)), helper.make_node("Range", ["a", "b", "d"], ["out"])],
        "broadcast": [const("r", np.zeros((side, 1), np.float32)),
                      const("c", np.zeros((1, side), np.float32)),
                      helper.make_node("Add", ["r", "c"], ["out"])],
        "gather": [const("t", np.zeros((side, 1), np.float32)),
                   const("i", np.zeros(side, np.int64)),
                   helper.make_node("Gather", ["t", "i"], ["idx"]),
                   helper.make_node("Gather", ["idx", "i"], ["out"], axis=1)],
    }[builder]
    assert computed_constant(make_view(chain(nodes, "out")), "out") is None


def test_size_limit_applies_to_leaves(monkeypatch):
    model = conv_zero_bias()
    view = make_view(model)
    monkeypatch.setattr(constants, "MAX_ELEMENTS", 11)  # w has 12 elements, the bias 4
    assert computed_constant(view, "w") is None
    assert computed_constant(view, "bias_out") is not None  # Shape(w) reads no data
    monkeypatch.setattr(constants, "MAX_ELEMENTS", 3)
    assert computed_constant(view, "bias_out") is None


def test_chains_the_evaluator_rejects_are_not_constant():
    nodes = [const("a", np.zeros(3, np.float32)), const("b", np.zeros(4, np.float32)),
             helper.make_node("Add", ["a", "b"], ["out"])]
    model = chain(nodes, "out")
    assert computed_constant(make_view(model), "out") is None


# ----------------------------------------------------------------------------- torch


def dynamo_export(module: nn.Module, path) -> onnx.ModelProto:
    torch.onnx.export(module.eval(), (torch.randn(3, 4, 12),), str(path), dynamo=True,
                      optimize=False, dynamic_shapes=({0: torch.export.Dim("batch")},))
    return onnx.load(str(path))


def test_torch_dynamo_conv_without_bias(tmp_path):
    model = dynamo_export(nn.Sequential(nn.Conv1d(4, 4, 3, groups=4, bias=False),
                                        nn.BatchNorm1d(4)), tmp_path / "conv.onnx")
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    view = make_view(model)
    stored = {t.name for t in model.graph.initializer}
    assert conv.input[2] not in stored and view.producer[conv.input[2]].op_type != "Constant"
    bias = computed_constant(view, conv.input[2])
    assert bias.dtype == np.float32 and bias.shape == (4,) and not bias.any()
    np.testing.assert_array_equal(view.constant(conv.input[2]), bias)  # what the rules read
    assert {n.op_type for n in computed_nodes(view, conv.input[2])} >= {"CastLike", "Expand"}


def test_torch_dynamo_batch_norm_without_affine(tmp_path):
    module = nn.Sequential(nn.Conv1d(4, 4, 3, groups=4), nn.BatchNorm1d(4, affine=False))
    model = dynamo_export(module, tmp_path / "bn.onnx")
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    view = make_view(model)
    np.testing.assert_array_equal(computed_constant(view, bn.input[1]), np.ones(4, np.float32))
    np.testing.assert_array_equal(computed_constant(view, bn.input[2]), np.zeros(4, np.float32))
    assert computed_constant(view, bn.input[0]) is None
