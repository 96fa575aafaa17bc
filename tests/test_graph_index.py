"""The graph index (`GraphView`) the fold pass builds once per graph and updates as it rewrites:
after any sequence of changes and a `refresh`, it is what a fresh index of the graph would be,
and the node list is what the changes say. Also the one-walk helpers: `rename_all` (which
respects subgraph scoping) and `remove_where`."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnfold.graph import GraphView, NameAllocator, remove_where, rename_all


def _view(model: onnx.ModelProto) -> GraphView:
    return GraphView(model, model.graph, outer=None, base_dir=None, allow_initializer_inputs=False,
                     shapes={}, types={}, names=NameAllocator(model))


def _snapshot(view: GraphView) -> dict:
    """The index as plain data: node ids, by name."""
    return {
        "producer": {name: id(node) for name, node in view.producer.items()},
        "users": {name: sorted(map(id, view.users(name)))
                  for name in view._readers},  # every name something reads
        "constant_nodes": {name: id(node) for name, node in view.scope.constant_nodes.items()},
        "initializers": {name: id(t) for name, t in view.scope.initializers.items()},
    }


def _random_model(n_nodes: int, seed: int) -> onnx.ModelProto:
    """A chain-ish DAG of unary and binary ops over a graph input, initializers and Constants;
    a few nodes read the same value twice."""
    rng = np.random.default_rng(seed)
    values, nodes, inits = ["x"], [], []
    for i in range(4):
        inits.append(numpy_helper.from_array(np.full(2, i, np.float32), f"w{i}"))
        values.append(f"w{i}")
    for i in range(n_nodes):
        kind = rng.integers(4)
        if kind == 0:
            nodes.append(helper.make_node("Constant", [], [f"v{i}"], name=f"n{i}",
                                          value=numpy_helper.from_array(np.ones(2, np.float32))))
        elif kind == 1:
            nodes.append(helper.make_node("Relu", [values[rng.integers(len(values))]], [f"v{i}"],
                                          name=f"n{i}"))
        else:
            a, b = (values[j] for j in rng.integers(len(values), size=2))
            nodes.append(helper.make_node("Add", [a, b], [f"v{i}"], name=f"n{i}"))
        values.append(f"v{i}")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info(values[-1], TensorProto.FLOAT, [2])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# One change: (kind, node pick, name pick, input pick); picks are reduced modulo what exists.
changes = st.lists(st.tuples(st.sampled_from(["input", "output", "remove", "insert", "init"]),
                             st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 3)),
                   max_size=40)


@settings(max_examples=60, deadline=None)
@given(n_nodes=st.integers(1, 30), seed=st.integers(0, 1000), batches=st.lists(changes, min_size=1,
                                                                              max_size=3))
def test_refreshed_index_equals_a_fresh_one_after_random_changes(n_nodes, seed, batches):
    model = _random_model(n_nodes, seed)
    view = _view(model)
    order = list(model.graph.node)  # the node list the changes should leave
    fresh = 0
    for batch in batches:
        removed: set[int] = set()
        inserted: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []
        for kind, pick, name_pick, slot in batch:
            alive = [n for n in order if id(n) not in removed]
            if not alive:
                break
            node = alive[pick % len(alive)]
            names = sorted({v for n in alive for v in (*n.input, *n.output) if v} | {"x"})
            if kind == "input" and node.op_type != "Constant":
                view.set_input(node, slot % (len(node.input) + 1), names[name_pick % len(names)])
            elif kind == "output":
                fresh += 1
                view.set_output(node, 0, f"renamed{fresh}")
            elif kind == "remove":
                view.remove(node)
                removed.add(id(node))
            elif kind == "insert":
                fresh += 1
                new = helper.make_node("Relu", [names[name_pick % len(names)]], [f"new{fresh}"],
                                       name=f"new{fresh}")
                inserted.append((view.insert_after(node, new), node))
            else:
                fresh += 1
                view.add_initializer(f"init{fresh}").CopyFrom(
                    numpy_helper.from_array(np.zeros(2, np.float32), f"init{fresh}"))
        view.refresh()
        expected = []
        for n in order:  # each inserted node right after its anchor, in insertion order
            expected.append(n)
            expected += [new for new, after in inserted if after is n]
        order = [n for n in expected if id(n) not in removed]
        assert [id(n) for n in model.graph.node] == [id(n) for n in order]
        assert _snapshot(view) == _snapshot(_view(model))


def test_index_counts_a_node_that_reads_a_name_twice_once_and_keeps_it_after_one_rewire():
    model = _random_model(0, 0)
    model.graph.node.append(helper.make_node("Add", ["x", "x"], ["y"], name="twice"))
    view = _view(model)
    (node,) = model.graph.node
    assert [id(n) for n in view.users("x")] == [id(node)]
    view.set_input(node, 1, "w0")
    view.refresh()
    assert [id(n) for n in view.users("x")] == [id(node)]
    assert [id(n) for n in view.users("w0")] == [id(node)]


def test_index_counts_a_subgraph_reading_an_outer_name_as_a_reader_of_it():
    body = helper.make_graph([helper.make_node("Relu", ["outer"], ["r"])], "body", [],
                             [helper.make_tensor_value_info("r", TensorProto.FLOAT, [2])])
    model = _random_model(0, 0)
    model.graph.node.extend([
        helper.make_node("Relu", ["x"], ["outer"], name="producer"),
        helper.make_node("If", ["cond"], ["out"], name="if", then_branch=body, else_branch=body)])
    view = _view(model)
    assert [n.name for n in view.users("outer")] == ["if"]
    assert view.sole_user("outer").name == "if"


def _if_model(body_defines: bool) -> onnx.ModelProto:
    """Main: Relu(x) -> a; If whose branches read `a` (or, with `body_defines`, make their own
    `a` and read that)."""
    inner = [helper.make_node("Neg", ["x"], ["a"])] if body_defines else []
    body = helper.make_graph(inner + [helper.make_node("Relu", ["a"], ["r"])], "body", [],
                             [helper.make_tensor_value_info("r", TensorProto.FLOAT, [2]),
                              helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]),
         helper.make_node("If", ["c"], ["r_out", "a_out"], then_branch=body, else_branch=body),
         helper.make_node("Add", ["a", "r_out"], ["y"])],
        "main", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                 helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_rename_all_renames_readers_in_subgraphs_and_their_outputs():
    model = _if_model(body_defines=False)
    rename_all(model.graph, {"a": "b"})
    body = model.graph.node[1].attribute[0].g
    assert list(model.graph.node[2].input) == ["b", "r_out"]
    assert list(body.node[0].input) == ["b"] and [o.name for o in body.output] == ["r", "b"]
    assert list(model.graph.node[0].output) == ["a"]  # producers keep their names


def test_rename_all_leaves_a_subgraph_that_defines_the_name_itself():
    model = _if_model(body_defines=True)
    rename_all(model.graph, {"a": "b"})
    body = model.graph.node[1].attribute[0].g
    assert list(model.graph.node[2].input) == ["b", "r_out"]
    assert list(body.node[1].input) == ["a"] and [o.name for o in body.output] == ["r", "a"]


def test_remove_where_keeps_the_order_of_what_stays_and_the_objects_themselves():
    graph = onnx.GraphProto()
    for i in range(100):
        graph.node.add(name=f"n{i}")
    nodes = list(graph.node)
    for predicate in (lambda n: int(n.name[1:]) % 3 == 0, lambda n: n.name == "n1"):
        survivors = [n for n in graph.node if not predicate(n)]
        removed = remove_where(graph.node, predicate)
        assert [n.name for n in graph.node] == [n.name for n in survivors]
        assert all(a is b for a, b in zip(graph.node, survivors))
        assert removed == len(nodes) - len(survivors)
        nodes = survivors
