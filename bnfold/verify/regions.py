"""The check of each rewritten region alone, for models that cannot be run whole.

When no random draw runs the whole reference (string inputs it parses, data-dependent shapes,
inputs without a declared shape...), the nodes that differ between the two models are found
(same op, inputs, outputs, attributes and constant contents, or not), grouped into connected
regions (linked by the values one node produces and another reads, and by the outputs both
models produce), and each region is cut out of both models as a small model from the values
it reads to the values the rest of the graph reads from it, with the constants it uses inside.
Shapes and types of those values come from onnx's shape inference; both small models then go
through the same draws and comparison as whole models. A region that cannot be run either
leaves the check undone: BadInput, never a pass.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import onnx
from onnx import helper, numpy_helper

from bnfold.errors import BadInput
from bnfold.graph import free_names, infer_shapes, is_external
from bnfold.nodes import display_name, subgraphs
from bnfold.report import RegionCheck, VerifyReport
from bnfold.verify.inputs import read_model


class _Side:
    """One model's view for the diff: its nodes, constants and shapes."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | None):
        self.model, self.base_dir = model, base_dir
        graph = model.graph
        fed = {i.name for i in graph.input} if model.ir_version >= 4 else set()
        self.initializers = {t.name: t for t in graph.initializer if t.name not in fed}
        self.constant_nodes = {n.output[0]: n for n in graph.node
                               if n.op_type == "Constant" and n.domain in ("", "ai.onnx")}
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.reads = {id(n): _reads(n) for n in graph.node}
        self.graph_outputs = {o.name for o in graph.output}
        self._shapes = None
        self._fingerprints: dict[str, bytes] = {}

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes

    def fingerprint(self, name: str) -> bytes:
        """The contents of initializer ``name``, hashed (external data is read)."""
        if name not in self._fingerprints:
            t = self.initializers[name]
            if is_external(t):
                array = numpy_helper.to_array(t, self.base_dir or "")
                data = array.tobytes() + str((array.dtype, array.shape)).encode()
            else:
                data = t.SerializeToString(deterministic=True)
            self._fingerprints[name] = hashlib.sha256(data).digest()
        return self._fingerprints[name]

    @property
    def shapes(self):
        if self._shapes is None:
            self._shapes = infer_shapes(self.model)
        return self._shapes


def _reads(node: onnx.NodeProto) -> list[str]:
    """The values a node reads: its inputs and what its subgraphs take from outside."""
    names = [n for n in node.input if n]
    for _, sub in subgraphs(node):
        names += sorted(free_names(sub))
    return names


def _signature(node: onnx.NodeProto) -> bytes:
    """The node as it computes (names and doc strings left out)."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name, copy.doc_string = "", ""
    return copy.SerializeToString(deterministic=True)


def changed_nodes(ref: _Side, cand: _Side) -> tuple[list, list]:
    """The nodes of each model's main graph that the other does not have as they are."""
    if {(o.domain, o.version) for o in ref.model.opset_import} != {
            (o.domain, o.version) for o in cand.model.opset_import}:
        return list(ref.model.graph.node), list(cand.model.graph.node)  # another opset: all

    def same_constants(node, side, other) -> bool:
        for name in side.reads[id(node)]:
            if side.is_constant(name) != other.is_constant(name):
                return False
            if name in side.initializers and (
                    name not in other.initializers
                    or side.fingerprint(name) != other.fingerprint(name)):
                return False
        return True

    def changed(side: _Side, other: _Side) -> list:
        theirs = {_signature(n) for n in other.model.graph.node}
        return [n for n in side.model.graph.node
                if _signature(n) not in theirs or not same_constants(n, side, other)]

    return changed(ref, cand), changed(cand, ref)


def regions(ref: _Side, cand: _Side) -> list[tuple[list, list]]:
    """Connected groups of changed nodes: (reference nodes, candidate nodes) each."""
    ref_nodes, cand_nodes = changed_nodes(ref, cand)
    nodes = [("ref", n) for n in ref_nodes] + [("cand", n) for n in cand_nodes]
    parent = list(range(len(nodes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    producers: dict[tuple[str, str], int] = {}  # (side, value) -> node index
    produced_by_name: dict[str, int] = {}
    for i, (side, node) in enumerate(nodes):
        for o in node.output:
            if o:
                producers[(side, o)] = i
                if o in produced_by_name:  # both models produce it: one region
                    parent[find(i)] = find(produced_by_name[o])
                produced_by_name.setdefault(o, i)
    for i, (side, node) in enumerate(nodes):
        reads = (ref if side == "ref" else cand).reads[id(node)]
        for name in reads:
            j = producers.get((side, name))
            if j is not None:
                parent[find(i)] = find(j)
    groups: dict[int, tuple[list, list]] = {}
    for i, (side, node) in enumerate(nodes):
        group = groups.setdefault(find(i), ([], []))
        group[0 if side == "ref" else 1].append(node)
    return list(groups.values())


def _cut(side: _Side, nodes: list, inputs: list[str], outputs: list[str],
         typed: _Side) -> onnx.ModelProto:
    """``nodes`` of ``side`` as a model from ``inputs`` to ``outputs`` (types from ``typed``)."""
    shapes, types = typed.shapes
    ours = {id(n) for n in nodes}
    body = [n for n in side.model.graph.node if id(n) in ours]
    needed = {name for n in body for name in side.reads[id(n)]}
    constants = [side.constant_nodes[name] for name in sorted(needed)
                 if name in side.constant_nodes and id(side.constant_nodes[name]) not in ours]
    initializers = [side.initializers[name] for name in sorted(needed)
                    if name in side.initializers]

    def info(name: str, region_input: bool) -> onnx.ValueInfoProto:
        elem = types.get(name)
        if elem is None:
            raise _Uncheckable(f"the type of '{name}' is unknown")
        shape = shapes.get(name)
        if shape is not None and region_input:  # an unknown size gets a symbolic name
            shape = [d if d is not None else f"{name}[{axis}]" for axis, d in enumerate(shape)]
        elif shape is None and region_input:
            raise _Uncheckable(f"the shape of '{name}' is unknown")
        return helper.make_tensor_value_info(name, elem, shape)

    graph = helper.make_graph(
        constants + body, "region",
        [info(name, True) for name in inputs], [info(name, False) for name in outputs],
        initializers,
    )
    if side.model.ir_version < 4:  # IR 3 lists every initializer as a graph input too
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                           for t in initializers)
    model = helper.make_model(graph, opset_imports=list(side.model.opset_import))
    model.ir_version = side.model.ir_version
    model.functions.extend(side.model.functions)
    return model


class _Uncheckable(Exception):
    pass


def check_regions(reference, candidate, *, base_dir, dims: Mapping[str, int] | None, atol, rtol,
                  seed: int, runs: int, verbose: bool, notes: list[str]) -> VerifyReport:
    """Check each rewritten region alone (see the module's docstring); BadInput if one cannot
    be run. ``notes``: why the whole model was not run."""
    from bnfold.verify import check_runs  # the whole-model check, on each region

    ref = _Side(read_model(reference), _directory(reference, base_dir))
    cand = _Side(read_model(candidate), _directory(candidate, base_dir))
    why = _why(notes)
    checks = []
    for number, (ref_nodes, cand_nodes) in enumerate(regions(ref, cand), 1):
        name = f"region {number}"
        inputs, outputs = _boundary(ref, cand, ref_nodes, cand_nodes)
        try:
            if not outputs:
                raise _Uncheckable("nothing reads what it computes")
            small_ref = _cut(ref, ref_nodes, inputs, outputs, ref)
            small_cand = _cut(cand, cand_nodes, inputs, outputs, ref)
        except _Uncheckable as err:
            raise BadInput(f"verification cannot be done: the whole model cannot be run ({why}), "
                           f"and {name} ({_names(ref_nodes)}) cannot be cut out: {err}") from None
        region_dims = {k: v for k, v in (dims or {}).items()
                       if any(k == d.dim_param for i in small_ref.graph.input
                              for d in i.type.tensor_type.shape.dim)}
        result = check_runs(small_ref, small_cand, ref_dir=ref.base_dir, cand_dir=cand.base_dir, inputs=None,
                            dims=region_dims, atol=atol, rtol=rtol, seed=seed, runs=runs,
                            verbose=verbose, role=f"{name} of the reference")
        if isinstance(result, list):  # no draw ran
            raise BadInput(f"verification cannot be done: the whole model cannot be run ({why}), "
                           f"nor {name} ({_names(ref_nodes)}): {'; '.join(result)}")
        check = RegionCheck(name=name, reference_nodes=[display_name(n) for n in ref_nodes],
                            candidate_nodes=[display_name(n) for n in cand_nodes],
                            inputs=inputs, outputs=result.outputs, draws=result.inputs)
        if result.error:
            check.outputs.append(_failed_run(outputs[0], result.error))
        checks.append(check)
    notes = [f"the whole model cannot be run ({why}): each rewritten region was checked alone"]
    if not checks:
        notes.append("no node differs between the models")
    return VerifyReport(inputs="random inputs per region", runs=runs,
                        method=f"regions: {len(checks)}", notes=notes, regions=checks)


def _boundary(ref: _Side, cand: _Side, ref_nodes: list, cand_nodes: list):
    """The values a region reads (not its constants) and those the rest of the graph reads."""
    inputs: list[str] = []
    produced: list[str] = []
    for side, nodes in ((ref, ref_nodes), (cand, cand_nodes)):
        made = {o for n in nodes for o in n.output if o}
        for n in nodes:
            for name in side.reads[id(n)]:
                if name not in made and not side.is_constant(name) and name not in inputs:
                    inputs.append(name)
        produced += [o for n in nodes for o in n.output if o and o not in produced]
    region = {id(n) for n in (*ref_nodes, *cand_nodes)}
    read_outside: set[str] = set()
    for side in (ref, cand):
        read_outside |= side.graph_outputs
        for n in side.model.graph.node:
            if id(n) not in region:
                read_outside.update(side.reads[id(n)])
    outputs = [o for o in produced if o in read_outside]
    for side, nodes, label in ((ref, ref_nodes, "reference"), (cand, cand_nodes, "candidate")):
        made = {o for n in nodes for o in n.output}
        missing = [o for o in outputs if o not in made]
        if missing:
            raise BadInput(f"verification cannot be done: the {label}'s side of a rewritten "
                           f"region does not compute {', '.join(missing)}")
    return inputs, outputs


def _why(notes: list[str]) -> str:
    """Why no draw ran the whole model, in brief: how many were tried and the first failure."""
    prefix = "skipped a draw the reference cannot run "
    skipped = [n.removeprefix(prefix) for n in notes if n.startswith(prefix)]
    other = [n for n in notes if not n.startswith(prefix)]
    if skipped:
        other.insert(0, f"the reference runs none of {len(skipped)} draws; the first, "
                        f"{skipped[0]}")
    return "; ".join(other) or "no draw runs it"


def _failed_run(output: str, error: str):
    from bnfold.verify import _mismatch
    return _mismatch(output, "", error)


def _names(nodes: list) -> str:
    names = [display_name(n) for n in nodes]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _directory(model, base_dir) -> str | None:
    if isinstance(model, onnx.ModelProto):
        return os.fspath(base_dir) if base_dir is not None else None
    return os.path.dirname(os.path.abspath(os.fspath(model)))
