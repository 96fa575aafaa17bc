"""Property test: random small graphs mixing linear layers (Conv, Gemm, MatMul(+Add)), activations,
no-op Casts and random affine chains (Sub/Mul/Add/Div/c-x by constants that are scalar, per
channel, along a wrong axis or along two axes), before or after activations, in NCHW images,
channels-last images (between layout Transposes), [batch, features] and [batch, seq, features].

For every generated model, `fold`:
- never crashes; its result passes onnx.checker, keeps the interface, leaves no dead constants and
  computes the same outputs as the unoptimised original (all via `fold_checked`, with the
  tolerances of builders.TOLERANCE);
- removes every no-op Cast except those producing a graph output, and counts them;
- never adds a Sub, Mul or Div;
- reaches a fixpoint: folding the result again folds nothing and removes no Cast.
Div constants stay away from 0 (the zero case is a refusal test in test_fold_affine.py).
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

import numpy as np

from builders import GraphBuilder, count_ops, fold_checked, noop_cast, noop_casts

CHANNELS = [2, 4, 6, 8]
SEQ = [5, 7]  # static sequence lengths, different from the batch (3) and from every channel count
STEP_OPS = ["Sub", "Mul", "Add", "Div", "RSub"]
AFFINE = ("Sub", "Mul", "Div")


def layouts(kind: str, shape: tuple) -> dict[str, list[list[tuple]]]:
    """Constant shapes for a value of `kind` and `shape` (without batch), by category, in groups
    of shapes that vary along the same axis (so a chain drawing from one group varies along one
    axis; "two" varies along two)."""
    if kind == "nchw":
        c, h, w = shape
        return {"scalar": [[(), (1, 1, 1, 1)]], "channel": [[(c, 1, 1), (1, c, 1, 1)]],
                "wrong": [[(h, 1), (1, 1, h, 1)], [(w,), (1, 1, 1, w)]], "two": [[(c, h, 1), (h, w)]]}
    if kind == "nhwc":
        h, w, c = shape
        return {"scalar": [[()]], "channel": [[(c,), (1, 1, 1, c)]],
                "wrong": [[(w, 1)], [(1, h, 1, 1), (h, 1, 1)]], "two": [[(w, c), (h, 1, c)]]}
    if kind == "dense":
        (f,) = shape
        return {"scalar": [[(), (1, 1)]], "channel": [[(f,), (1, f)]], "wrong": [], "two": []}
    t, f = shape
    return {"scalar": [[(), (1, 1, 1)]], "channel": [[(f,), (1, f), (1, 1, f)]],
            "wrong": [[(t, 1), (1, t, 1)]], "two": [[(t, f)]]}


@st.composite
def step_constant(draw, op: str, shape: tuple):
    """A float32 constant for one chain step; Mul scales may hold exact zeros, Div never."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if op in ("Mul", "Div"):
        value = np.where(rng.random(shape) < 0.3, -1.0, 1.0) * rng.uniform(0.5, 2.0, shape)
        if op == "Mul" and draw(st.integers(0, 7)) == 0:
            value = np.where(rng.random(shape) < 0.3, 0.0, value)
    else:
        value = rng.normal(0.0, 1.0, shape)
    return np.asarray(value, dtype=np.float32)


def add_chain(draw, b: GraphBuilder, x: str, kind: str, shape: tuple, name: str):
    """A random chain of 1-4 steps on `x`, maybe with Casts between. The chain draws one
    category (mostly per channel) and one axis group of it; each step's constant is a scalar or
    of that group. Returns (output, whether the chain is a per-channel map of any form but a
    run of Adds, which a linear layer before it always takes)."""
    options = layouts(kind, shape)
    category = draw(st.sampled_from([c for c in ("scalar", "channel", "channel", "channel",
                                                 "wrong", "wrong", "two") if options[c]]))
    group = draw(st.sampled_from(options[category])) + options["scalar"][0]
    ops = []
    for i in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(STEP_OPS))
        ops.append(op)
        value = draw(step_constant(op, draw(st.sampled_from(group))))
        c = b.value(f"{name}_c{i}", value, draw(st.sampled_from(["initializer", "constant"])))
        if draw(st.integers(0, 3)) == 0:
            x = noop_cast(b, x, f"{name}_cast{i}")
        first = op == "RSub" or (op in ("Mul", "Add") and draw(st.booleans()))
        x = b.node("Sub" if op == "RSub" else op, [c, x] if first else [x, c],
                   name=f"{name}_{op.lower()}{i}")
    return x, category in ("scalar", "channel") and set(ops) != {"Add"}


def add_linear(draw, b: GraphBuilder, x: str, kind: str, shape: tuple, name: str):
    """A linear layer on `x`: Conv (NCHW), Gemm or MatMul(+Add) (dense), MatMul(+Add) (seq)."""
    if kind == "nchw":
        c_in, h, w = shape
        c_out = draw(st.sampled_from(CHANNELS))
        kernel = draw(st.sampled_from([1, 3] if min(h, w) >= 3 else [1]))
        pads = draw(st.integers(0, 1)) if kernel == 3 else 0
        inputs = [x, b.weight(f"{name}_W", [c_out, c_in, kernel, kernel])]
        if draw(st.booleans()):
            inputs.append(b.weight(f"{name}_B", [c_out], fan_in=1))
        x = b.node("Conv", inputs, name=name, kernel_shape=[kernel, kernel], pads=[pads] * 4)
        return x, (c_out, h + 2 * pads - kernel + 1, w + 2 * pads - kernel + 1)
    k, n = shape[-1], draw(st.sampled_from(CHANNELS))
    if kind == "dense" and draw(st.booleans()):
        trans_b = draw(st.sampled_from([0, 1]))
        inputs = [x, b.weight(f"{name}_B", [n, k] if trans_b else [k, n], fan_in=k)]
        c = draw(st.sampled_from([None, [n], [1, n]]))
        if c is not None:
            inputs.append(b.weight(f"{name}_C", c, fan_in=1))
        x = b.node("Gemm", inputs, name=name, transB=trans_b,
                   beta=draw(st.sampled_from([1.0, 0.5])))
        return x, (n,)
    x = b.node("MatMul", [x, b.weight(f"{name}_W", [k, n], fan_in=k)], name=name)
    if draw(st.booleans()):
        bias = b.weight(f"{name}_bias", [n], fan_in=1)
        if draw(st.integers(0, 3)) == 0:
            x = noop_cast(b, x, f"{name}_cast")
        x = b.node("Add", [x, bias] if draw(st.booleans()) else [bias, x], name=f"{name}_add")
    return x, shape[:-1] + (n,)


@st.composite
def random_models(draw):
    """(model, chains that must fold): a random small model ending in graph output "y" (plus,
    now and then, an intermediate value as a second graph output, so that some chains and layers
    have two uses), and the name prefixes of the chains that directly follow a linear layer
    (maybe through a layout Transpose), are per channel (or scalar), and are not merged with a
    following chain."""
    b = GraphBuilder(seed=draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["nchw", "dense", "seq"]))
    if kind == "nchw":
        shape = (draw(st.sampled_from(CHANNELS)), draw(st.integers(4, 7)), draw(st.integers(4, 7)))
    elif kind == "dense":
        shape = (draw(st.sampled_from(CHANNELS)),)
    else:
        shape = (draw(st.sampled_from(SEQ)), draw(st.sampled_from(CHANNELS)))
    x = b.input("x", ["batch", *shape])
    extra, must_fold, pending = [], [], None
    steps = ["linear", "linear", "chain", "chain", "act", "cast"] + (["nhwc"] if kind == "nchw" else [])
    for i in range(draw(st.integers(1, 6))):
        step = draw(st.sampled_from(steps))
        if step == "chain":
            pending = None  # a chain right after another one (Casts aside) is one longer chain
        elif step != "cast" and pending:
            must_fold.append(pending)
            pending = None
        if step == "linear":
            x, shape = add_linear(draw, b, x, kind, shape, f"linear{i}")
        elif step == "chain":
            x, _ = add_chain(draw, b, x, kind, shape, f"chain{i}")
        elif step == "nhwc":  # Keras layout: the chain runs channels-last between Transposes
            after_conv = draw(st.booleans())
            if after_conv:  # as Keras writes Conv2D + BatchNormalization
                x, shape = add_linear(draw, b, x, kind, shape, f"linear{i}")
            x = b.node("Transpose", [x], name=f"to_nhwc{i}", perm=[0, 2, 3, 1])
            c, h, w = shape
            x, per_channel = add_chain(draw, b, x, "nhwc", (h, w, c), f"chain{i}")
            if after_conv and per_channel:
                must_fold.append(f"chain{i}_")
            x = b.node("Transpose", [x], name=f"to_nchw{i}", perm=[0, 3, 1, 2])
        elif step == "act":
            x = b.node(draw(st.sampled_from(["Relu", "Sigmoid", "Tanh"])), [x], name=f"act{i}")
        else:
            x = noop_cast(b, x, f"cast{i}")
        if step in ("linear", "act") and draw(st.booleans()):
            # A chain right after a layer or an activation half the time: the patterns the
            # rules are about, dense enough to meet every rule in a few dozen examples.
            x, per_channel = add_chain(draw, b, x, kind, shape, f"chain{i}b")
            if step == "linear" and per_channel:
                pending = f"chain{i}b_"
        if draw(st.integers(0, 7)) == 0:
            extra.append(x)
    if pending:
        must_fold.append(pending)
    if x in extra or x == "x":
        x = b.node("Identity", [x], name="out")
    b.node("Identity", [x], name="final", outputs=["y"])
    b.output("y", *dict.fromkeys(v for v in extra if v != "x"))
    return b.build(), must_fold


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_models())
def test_fold_random_graphs_with_affine_chains_keeps_outputs(case):
    from bnfold.fold import fold

    model, must_fold = case
    folded, report = fold_checked(model)

    if report.changed:  # no-op Casts go with the folds (but one producing a graph output)
        stay = noop_casts(model, graph_outputs_only=True)
        assert report.removed_casts == noop_casts(model) - stay
        assert noop_casts(folded) == stay
    else:  # nothing to fold: the model exactly as it was, Casts too
        assert report.removed_casts == 0
        assert folded.SerializeToString() == model.SerializeToString()
    producers = {o: n for n in folded.graph.node for o in n.output}
    for prefix in must_fold:  # folded into the layer before it: none of its nodes is left,
        # but for a leading Add right after a MatMul: that is the layer's bias, and it stays
        left = [n.name for n in folded.graph.node if n.name.startswith(prefix)
                and not (n.op_type == "Add" and any(
                    producers.get(i) is not None and producers[i].op_type == "MatMul"
                    for i in n.input))]
        assert not left, f"chain {prefix}* not folded: " + "; ".join(
            d.describe() for d in report.decisions)
    before, after = count_ops(model), count_ops(folded)
    for op in AFFINE:
        assert after[op] <= before[op], f"{op}: {before[op]} -> {after[op]}"
    _, again = fold(folded)
    assert not again.folded and not again.removed_casts, "not a fixpoint: " + "; ".join(
        d.describe() for d in again.folded)


def _after_layout_transpose(model, decision) -> bool:
    """The chain of `decision` runs channels-last (generated between layout Transposes)."""
    index = decision.node.split("_")[0].removeprefix("chain")
    return any(n.name == f"to_nhwc{index}" for n in model.graph.node)


def test_generator_meets_every_kind_of_decision():
    """Guard for the property test: the generator makes chains that fold backward (also through
    a layout Transpose), fold forward, and are refused for their axis (searched without
    shrinking, so this stays cheap)."""
    from bnfold.fold import fold

    def decided(predicate):
        def check(case):
            model = case[0]
            return any(d.op == "affine" and predicate(model, d) for d in fold(model)[1].decisions)
        return check

    search = settings(max_examples=500, deadline=None, database=None, phases=[Phase.generate],
                      derandomize=True)
    for what, predicate in {
        "backward": lambda m, d: d.direction == "backward",
        "forward": lambda m, d: d.direction == "forward",
        "backward channels-last": lambda m, d: (d.direction == "backward"
                                                and _after_layout_transpose(m, d)),
        "refused for its axis": lambda m, d: d.action == "kept" and "feature axis" in (d.reason or ""),
    }.items():
        assert find(random_models(), decided(predicate), settings=search) is not None, what
    assert find(random_models(), lambda case: len(case[1]) >= 2, settings=search)
