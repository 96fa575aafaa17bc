"""Property test: random small graphs of Conv/ConvTranspose/Gemm/MatMul/Add/Relu/Sigmoid/Flatten/BN.

For every generated model, `fold`:
- never crashes, and its result passes onnx.checker, keeps the interface and computes the same
  outputs as the unoptimised original (all via `fold_checked`);
- never increases the number of BNs;
- removes every BN where a documented rule applies trivially (see `trivially_foldable`);
- reaches a fixpoint: folding the result again folds nothing more.

The last section guards the test machinery itself: the generator makes the patterns it claims,
every builder's model runs in onnxruntime, and `compare` notices small errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import builders
from builders import (
    BN,
    TOLERANCE,
    GraphBuilder,
    compare,
    count_ops,
    fold_checked,
    random_feeds,
    run_model,
)

# Linear layers twice as likely as the rest: they are what the rules are about.
OPS_4D = ["Conv", "Conv", "ConvTranspose", "ConvTranspose", "BN", "Relu", "Sigmoid", "AddConst",
          "Residual", "Flatten"]
OPS_2D = ["Gemm", "Gemm", "MatMul", "MatMulAdd", "BN", "Relu", "Sigmoid", "AddConst", "Residual"]
CHANNELS = [2, 4, 6]
SOURCES = ["initializer", "constant"]  # where BN parameters come from


def _groups(c_in: int, c_out: int) -> list[int]:
    return [g for g in sorted({1, 2, c_in}) if c_in % g == 0 and c_out % g == 0]


@st.composite
def random_models(draw):
    """A random small model; the graph output is the last value, plus a few random
    intermediate values made graph outputs too (so some producers have two uses)."""
    b = GraphBuilder(seed=draw(st.integers(0, 2**16)))
    if draw(st.booleans()):
        c, h, w = draw(st.sampled_from(CHANNELS)), draw(st.integers(3, 6)), draw(st.integers(3, 6))
        shape = (c, h, w)
    else:
        shape = (draw(st.sampled_from([2, 4, 6, 8])),)
    x = b.input("x", ["batch", *shape])
    history = [(x, shape)]
    extra_outputs = []
    for i in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(OPS_4D if len(shape) == 3 else OPS_2D))
        name = f"{op.lower()}{i}"
        if op == "Conv":
            c_in, h, w = shape
            c_out = draw(st.sampled_from(CHANNELS))
            group = draw(st.sampled_from(_groups(c_in, c_out)))
            kernel = draw(st.sampled_from([1, 3] if min(h, w) >= 3 else [1]))
            pads = draw(st.integers(0, 1))
            inputs = [x, b.weight(f"{name}_W", [c_out, c_in // group, kernel, kernel])]
            if draw(st.booleans()):
                inputs.append(b.weight(f"{name}_B", [c_out], fan_in=1))
            x = b.node("Conv", inputs, name=name, kernel_shape=[kernel, kernel],
                       pads=[pads] * 4, group=group)
            shape = (c_out, h + 2 * pads - kernel + 1, w + 2 * pads - kernel + 1)
        elif op == "ConvTranspose":
            c_in, h, w = shape
            c_out = draw(st.sampled_from(CHANNELS))
            group = draw(st.sampled_from(_groups(c_in, c_out)))
            kernel = draw(st.integers(1, 3))
            stride = draw(st.sampled_from([1, 2] if max(h, w) <= 6 else [1]))
            pads = draw(st.integers(0, kernel - 1))
            out_h, out_w = ((d - 1) * stride - 2 * pads + kernel for d in (h, w))
            if min(out_h, out_w) < 1:
                pads, out_h, out_w = 0, (h - 1) * stride + kernel, (w - 1) * stride + kernel
            inputs = [x, b.weight(f"{name}_W", [c_in, c_out // group, kernel, kernel],
                                  fan_in=(c_in // group) * kernel * kernel)]
            if draw(st.booleans()):
                inputs.append(b.weight(f"{name}_B", [c_out], fan_in=1))
            x = b.node("ConvTranspose", inputs, name=name, kernel_shape=[kernel, kernel],
                       pads=[pads] * 4, strides=[stride, stride], group=group)
            shape = (c_out, out_h, out_w)
        elif op == "Gemm":
            (k,), n = shape, draw(st.sampled_from([2, 4, 6, 8]))
            trans_b = draw(st.sampled_from([0, 1]))
            inputs = [x, b.weight(f"{name}_B", [n, k] if trans_b else [k, n], fan_in=k)]
            c = draw(st.sampled_from([None, [n], [1, n], []]))
            if c is not None:
                inputs.append(b.weight(f"{name}_C", c, fan_in=1))
            x = b.node("Gemm", inputs, name=name, transB=trans_b,
                       alpha=draw(st.sampled_from([1.0, 0.5, 2.0])),
                       beta=draw(st.sampled_from([1.0, 0.5, 0.0])))
            shape = (n,)
        elif op in ("MatMul", "MatMulAdd"):
            (k,), n = shape, draw(st.sampled_from([2, 4, 6, 8]))
            x = b.node("MatMul", [x, b.weight(f"{name}_W", [k, n], fan_in=k)], name=name)
            if op == "MatMulAdd":
                bias = b.weight(f"{name}_bias", [n], fan_in=1)
                x = b.node("Add", [x, bias] if draw(st.booleans()) else [bias, x],
                           name=f"{name}_add")
            shape = (n,)
        elif op == "BN":
            x = b.bn(x, shape[0], name=name, source=draw(st.sampled_from(SOURCES)),
                     epsilon=draw(st.sampled_from([1e-5, 1e-3])))
        elif op in ("Relu", "Sigmoid"):
            x = b.node(op, [x], name=name)
        elif op == "Flatten":
            x = b.node("Flatten", [x], name=name, axis=1)
            shape = (math.prod(shape),)
        else:  # AddConst, or Residual with an earlier value of the same shape
            earlier = [v for v, s in history[:-1] if s == shape]
            if op == "Residual" and earlier:
                other = draw(st.sampled_from(earlier))
            else:
                const_shape = [shape[0], 1, 1] if len(shape) == 3 else [shape[0]]
                other = b.weight(f"{name}_K", const_shape, fan_in=1)
            x = b.node("Add", [x, other], name=name)
        if op != "BN" and op != "Flatten" and op != "AddConst" and draw(st.booleans()):
            # A BN right after a linear layer or an activation half the time: the patterns
            # the rules are about, dense enough to meet every rule in a few dozen examples.
            x = b.bn(x, shape[0], name=f"bn{i}", source=draw(st.sampled_from(SOURCES)),
                     epsilon=draw(st.sampled_from([1e-5, 1e-3])))
        history.append((x, shape))
        if draw(st.integers(0, 9)) == 0:
            extra_outputs.append(x)
    b.output(x, *[v for v in dict.fromkeys(extra_outputs) if v != x])
    return b.build()


def trivially_foldable(model) -> set[str]:
    """Names of the BNs a documented rule folds with nothing in the way.

    Backward: the producer is Conv, ConvTranspose, Gemm, rank-2 MatMul, or the Add of a
    MatMul + constant bias, whose output (and the MatMul's) goes only to the BN / Add and is no
    graph output. Forward: the BN reads a graph input or an activation and its output goes only
    to input 0 of a Gemm (no transA), a rank-2 MatMul, a Conv without padding, or a Flatten(axis
    1) feeding only a Gemm; none of those values a graph output.
    (The generator only makes constant weights, rank-2 dense values and explicit pads.)
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    constants = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    def only_consumer(value):
        users = consumers.get(value, [])
        return users[0] if len(users) == 1 and value not in outputs else None

    def attr(node, name, default):
        return next((a.i for a in node.attribute if a.name == name), default)

    def pads_of(node):
        return next((list(a.ints) for a in node.attribute if a.name == "pads"), [0])

    result = set()
    for bn in (n for n in graph.node if n.op_type == BN):
        src = producer.get(bn.input[0])
        backward = (
            src is not None and only_consumer(src.output[0]) is bn and (
                src.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") or (
                    src.op_type == "Add"
                    and any(i in constants for i in src.input)
                    and any(producer.get(i) is not None and producer[i].op_type == "MatMul"
                            and only_consumer(i) is src for i in src.input))))
        nxt = only_consumer(bn.output[0])
        forward = (
            (src is None or src.op_type in ("Relu", "Sigmoid")) and nxt is not None
            and nxt.input[0] == bn.output[0] and (
                (nxt.op_type == "Gemm" and attr(nxt, "transA", 0) == 0)
                or nxt.op_type == "MatMul"
                or (nxt.op_type == "Conv" and not any(pads_of(nxt)))
                or (nxt.op_type == "Flatten"
                    and getattr(only_consumer(nxt.output[0]), "op_type", None) == "Gemm"
                    and only_consumer(nxt.output[0]).input[0] == nxt.output[0]
                    and attr(only_consumer(nxt.output[0]), "transA", 0) == 0)))
        if backward or forward:
            result.add(bn.name)
    return result


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=random_models())
def test_fold_random_graphs_keeps_outputs_and_removes_every_trivially_foldable_bn(model):
    from bnfold.fold import fold

    folded, report = fold_checked(model)
    before, after = count_ops(model)[BN], count_ops(folded)[BN]
    assert after <= before
    missed = trivially_foldable(model) - {d.node for d in report.folded}
    assert not missed, "not folded: " + "; ".join(
        d.describe() for d in report.decisions if d.node in missed)
    _, again = fold(folded)
    assert not again.folded, "not a fixpoint: " + "; ".join(d.describe() for d in again.folded)


def test_generator_produces_the_patterns_it_claims():
    """Guard for the property test: the generator really makes trivially foldable BNs after each
    kind of layer (searched without shrinking, so this stays cheap)."""
    from hypothesis import Phase, find

    def foldable_after(kind):
        def check(model):
            producer = {o: n.op_type for n in model.graph.node for o in n.output}
            return any(producer.get(n.input[0]) == kind for n in model.graph.node
                       if n.op_type == BN and n.name in trivially_foldable(model))
        return check

    search = settings(max_examples=500, deadline=None, database=None, phases=[Phase.generate],
                      derandomize=True)
    for kind in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Relu", "Sigmoid", None):
        model = find(random_models(), foldable_after(kind), settings=search)
        assert trivially_foldable(model), kind


# --- the test machinery itself ------------------------------------------------------------

BUILDERS = {
    "conv_bn": lambda: builders.conv_bn(),
    "conv_bn_3d_depthwise": lambda: builders.conv_bn(rank=3, c_in=4, c_out=8, group=4),
    "conv_bn_opset7_ir3": lambda: builders.conv_bn(opset=7, ir_version=3),
    "conv_bn_fp16": lambda: builders.conv_bn(dtype="fp16"),
    "conv_bn_bf16": lambda: builders.conv_bn(dtype="bf16", opset=22),
    "conv_bn_training": lambda: builders.conv_bn(opset=15, training_mode=1, n_outputs=3),
    "conv_transpose_bn": lambda: builders.conv_transpose_bn(group=2),
    "gemm_bn": lambda: builders.gemm_bn(m=3, trans_a=1, trans_b=1, c="mn", beta=0.5),
    "matmul_bn": lambda: builders.matmul_bn(bias="left"),
    "matmul3d_bn_on_seq": lambda: builders.matmul3d_bn_on_seq(),
    "bn_gemm": lambda: builders.bn_gemm(expose_bn=True),
    "bn_matmul": lambda: builders.bn_matmul(),
    "bn_conv": lambda: builders.bn_conv(auto_pad="SAME_UPPER"),
    "conv_relu_bn_flatten_gemm": lambda: builders.conv_relu_bn_flatten_gemm(via="Reshape"),
    "keras_mlp": lambda: builders.keras_mlp(),
    "conv_bn_shared_output": lambda: builders.conv_bn_shared_output(also="consumer"),
    "conv_bn_per_activation": lambda: builders.conv_bn_per_activation(),
    "act_bn_tail": lambda: builders.act_bn_tail(),
    "bn_gemm_trans_a": lambda: builders.bn_gemm_trans_a(),
    "bn_matmul3d": lambda: builders.bn_matmul3d(),
    "conv_bn_relu_bn_conv": lambda: builders.conv_bn_relu_bn_conv(),
    "shared_weight_convs": lambda: builders.shared_weight_convs(both_bn=True),
    "if_bn": lambda: builders.if_bn(),
    "loop_bn": lambda: builders.loop_bn(),
}


@pytest.mark.parametrize("name", BUILDERS)
def test_builder_models_run_in_onnxruntime(name):
    """Each builder's model runs (unoptimised; bf16 upcast) with finite outputs of the declared
    static sizes and the symbolic batch of 3."""
    model = BUILDERS[name]()
    assert count_ops(model)[BN] >= 1
    results = run_model(model, random_feeds(model))
    for out in model.graph.output:
        value = results[out.name]
        declared = [d.dim_value if d.HasField("dim_value") else 3
                    for d in out.type.tensor_type.shape.dim]
        assert list(value.shape) == declared, out.name
        assert np.all(np.isfinite(value.astype(np.float64))), out.name


def test_compare_detects_a_small_relative_error():
    out = run_model(builders.conv_bn(), random_feeds(builders.conv_bn()))["y"]
    atol, rtol = TOLERANCE["fp32"]
    assert compare(out, out, atol, rtol) is None
    assert compare(out * (1 + 1e-3), out, atol, rtol) is not None
    assert compare(np.where(out > 0, np.nan, out), out, atol, rtol) is not None
