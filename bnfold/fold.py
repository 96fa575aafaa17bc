"""The fold pass: remove every batch norm that can be folded exactly into a neighbouring layer.

load -> for each graph (subgraphs too): find BN -> check -> plan -> rewrite, to a fixpoint ->
collect dead constants -> report. Rules live in `bnfold.rules`; this module only drives them.
"""

from __future__ import annotations

import os

import onnx
from onnx import helper

from bnfold import changes
from bnfold.affine import Affine, bn_affine, cast_to, set_inference_mode, training_reason
from bnfold.errors import BadInput, one_line
from bnfold.graph import (MIN_OPSET, GraphView, Inference, NameAllocator, Scope, default_opset,
                          is_external, remove_where)
from bnfold.io import model_argument
from bnfold.nodes import attr, display_name, graphs, subgraphs
from bnfold.report import Decision, FoldReport, ModelStats
from bnfold.rules import RULES
from bnfold.rules.chains import chain_affine, chain_heads, remove_noop_casts
from bnfold.rules.plan import Plan, Rewriter, Spill, fill

# How far from a batch norm the rules look: back to Linear -> [bias Add] -> Transpose -> [bias
# Add], forward to Transpose/Flatten -> Linear -> bias Add.
_RULE_REACH = 3


def fold(model: onnx.ModelProto | str | os.PathLike, *, base_dir: str | None = None,
         allow_initializer_inputs: bool = False, training_to_inference: bool = False,
         lower_standalone: bool = False, inplace: bool = False,
         spill: bool | None = None) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every batch norm of `model` that can be folded exactly; keep the others, with reasons.

    `model`: a ModelProto or a path (loaded by `bnfold.load`; BadInput if it cannot be).
    Returns the folded model and a `FoldReport`. `model` is left untouched unless `inplace`.
    When nothing is folded or lowered (`report.changed` is False), the model is returned
    exactly as it was, with a "nothing to fold" note. Models of opset 1..6 with batch norms
    are converted to opset 7 first (`report.upgraded_from`).
    `base_dir` is the directory external data is read from, for models loaded without it.
    `spill`: write new weights to a scratch file (removed at exit) instead of memory, for
    `bnfold.save` to stream; the default spills for models whose weights are on disk.
    """
    model, base_dir, loaded = model_argument(model, base_dir)
    original, report = model, FoldReport()
    opset = default_opset(model)
    if opset < MIN_OPSET:
        report.before = model_stats(model)
        upgraded = _upgrade(model, opset, report)
        if upgraded is None:
            return _unchanged(original, inplace or loaded, report)
        model, report.upgraded_from = upgraded, opset
    elif not (inplace or loaded):
        model = _copy(model)
    first = changes.snapshot(model)  # (switching to inference mode changes no node)
    if report.before is None:
        report.before = changes.census(model, first)
    switched = 0
    if training_to_inference:
        switched, dropped = _to_inference_mode(model)
        if dropped:
            report.notes.append(f"training mode -> inference mode: dropped the running-statistics "
                                f"outputs {', '.join(dropped)}")
    run = _FoldRun(model, base_dir, allow_initializer_inputs, lower_standalone, spill, report)
    # No-op Casts go only if something folds: a model with nothing to fold stays as it was.
    before_casts = _snapshot(model)
    report.removed_casts = remove_noop_casts(model, lambda name: run.inference.types.get(name))
    cast_free = changes.snapshot(model) if report.removed_casts else first
    run.fold_graph(model.graph, None, "main")
    report.changed = bool(report.folded or report.lowered or switched)
    if not report.changed:
        upgraded, report.removed_casts, report.upgraded_from = report.upgraded_from, 0, None
        if upgraded is not None:  # the input as it was, not its conversion
            return _unchanged(original, inplace or loaded, report)
        _restore(model, before_casts)  # `model` is the input, or already a copy of it
        return _unchanged(model, True, report, first)
    rewritten = changes.snapshot(model)
    collected = changes.snapshot(model) if run.collect_garbage() else rewritten
    report.after = changes.census(model, collected)
    _report_changes(report, [first, cast_free, rewritten, collected])
    return model, report


def _report_changes(report: FoldReport, snapshots: list) -> None:
    """Decisions in graph order; the other nodes the pass removed, by why: between the
    snapshots taken before and after removing no-op Casts, the folds, and collecting dead
    constants."""
    order = changes.graph_order(snapshots[0])
    report.decisions.sort(key=lambda d: order.get((d.graph, d.node), len(order)))
    batch_norms = {(d.graph, n) for d in report.decisions for n in [d.node, *d.nodes]}
    whys = ["no-op", "merged into a layer", "unused after folding"]
    for why, before, after in zip(whys, snapshots, snapshots[1:]):
        if after is not before:  # (the same snapshot when a stage removed nothing)
            report.removed += changes.removed_nodes(before, after, why, batch_norms)
    report.removed.sort(key=lambda r: order.get((r.graph, r.name), len(order)))


def upgrade(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` converted to opset 7 by onnx's version converter when its opset is older (what
    `fold` folds, and what onnxruntime can run: it has no BatchNormalization-6 kernel); else
    `model` itself. Raises BadInput when the converter fails."""
    opset = default_opset(model)
    if opset >= MIN_OPSET:
        return model
    try:
        return onnx.version_converter.convert_version(model, MIN_OPSET)
    except Exception as err:  # the converter raises RuntimeError and its own ConvertError
        raise BadInput(f"cannot convert opset {opset} to {MIN_OPSET}: {one_line(err)}") from None


def _upgrade(model: onnx.ModelProto, opset: int, report: FoldReport) -> onnx.ModelProto | None:
    """The opset-7 conversion of an opset 1..6 model with batch norms to fold; None (and the
    reasons in `report`) when there is none to fold or the conversion fails."""
    batch_norms = [(path, node) for path, graph in _graph_paths(model.graph, "main")
                   for node in graph.node if _is_bn(node)]

    def keep_all(reason_of) -> None:
        for path, node in batch_norms:
            report.decisions.append(Decision(node=display_name(node), action="kept",
                                             reason=reason_of(node), graph=path))

    if not batch_norms:
        return None
    if all(not attr(node, "is_test", 0) for _, node in batch_norms):
        keep_all(lambda node: f"BN in training mode (opset {opset}, is_test=0)")
        return None
    try:
        return upgrade(model)
    except BadInput as err:
        keep_all(lambda node: f"opset {opset}: {err}")
        return None


def _unchanged(model: onnx.ModelProto, inplace: bool, report: FoldReport,
               seen: list[changes.Seen] | None = None) -> tuple[onnx.ModelProto, FoldReport]:
    """`model` as it was (a copy unless `inplace`), with the note saying why; `seen`, its
    snapshot when the caller has one."""
    report.changed, report.after = False, report.before
    order = changes.graph_order(seen if seen is not None else changes.snapshot(model))
    report.decisions.sort(key=lambda d: order.get((d.graph, d.node), len(order)))
    if not report.decisions:
        why = "no batch norm in the model"
        if model.producer_name.startswith("pytorch"):
            why += " (torch's exporter already fuses Conv+BN in eval mode)"
    elif any(d.action == "kept" for d in report.decisions):
        why = "every batch norm kept"
    else:
        why = "no batch norm folded"
    report.notes.append(f"nothing to fold: {why}")
    return (model if inplace else _copy(model)), report


def _snapshot(model: onnx.ModelProto) -> tuple[list, list] | None:
    """The main graph's nodes and value_info (subgraphs are inside the nodes), when it has a
    Cast anywhere that `remove_noop_casts` may remove; `_restore` puts them back."""
    if not any(n.op_type == "Cast" for g in graphs(model.graph) for n in g.node):
        return None
    copies = []
    for field_name in ("node", "value_info"):
        items = []
        for item in getattr(model.graph, field_name):
            copy = type(item)()
            copy.CopyFrom(item)
            items.append(copy)
        copies.append(items)
    return copies[0], copies[1]


def _restore(model: onnx.ModelProto, snapshot: tuple[list, list] | None) -> None:
    if snapshot is None:
        return
    for field_name, items in zip(("node", "value_info"), snapshot):
        del getattr(model.graph, field_name)[:]
        getattr(model.graph, field_name).extend(items)


def _graph_paths(graph: onnx.GraphProto, path: str):
    """(path, graph) for `graph` and its subgraphs, paths as in the report's decisions."""
    yield path, graph
    for node in graph.node:
        for attr_name, sub in subgraphs(node):
            yield from _graph_paths(sub, f"{path}/{display_name(node)}:{attr_name}")


def to_inference_mode(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose training-mode BNs use their running statistics instead; graph
    outputs that were their updated statistics are dropped (as `fold` drops them)."""
    model = _copy(model)
    _to_inference_mode(model)
    return model


def model_stats(model: onnx.ModelProto) -> ModelStats:
    """Node counts (by op type too) and parameter count, subgraphs included; reads no tensor
    data."""
    return changes.census(model, changes.snapshot(model))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _batch_norms(view: GraphView, known: dict[int, tuple]):
    """Every batch norm of the graph (BN nodes, affine chains): an `Affine`, or (node, op, reason)
    when it is not a fixed affine map.

    `known` keeps each BN node's result from scan to scan (keyed by id, with the node): nothing
    a BN's map is read from changes while the node stays, since rewrites change only the
    layers' inputs and outputs, and fill only the initializers a layer alone reads.
    """
    for node in view.graph.node:
        if _is_bn(node):
            entry = known.get(id(node))
            if entry is None or entry[0] is not node:
                entry = known[id(node)] = (node, bn_affine(view, node))
            aff = entry[1]
            yield (node, "BatchNormalization", aff) if isinstance(aff, str) else aff
    for head in chain_heads(view):
        aff = chain_affine(view, head)
        yield (head, "affine", aff) if isinstance(aff, str) else aff


def _near(view: GraphView, nodes: list[onnx.NodeProto], values: set[str],
          hops: int = _RULE_REACH) -> bool:
    """Whether a node within `hops` nodes of `nodes`, upstream or downstream, has one of
    `values` as an input or output."""
    producer, users, disjoint = view.producer.get, view.users, values.isdisjoint
    seen = {id(n) for n in nodes}
    frontier = nodes
    for hop in range(hops + 1):
        ends = list(map(view.ends, frontier))
        for inputs, outputs in ends:
            if not (disjoint(inputs) and disjoint(outputs)):
                return True
        if hop == hops:
            return False
        near = []
        for inputs, outputs in ends:
            near += map(producer, inputs)
            for name in outputs:
                near += users(name)
        frontier = []
        for n in near:
            if n is not None and id(n) not in seen:
                seen.add(id(n))
                frontier.append(n)
    return False


def _is_bn(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def _to_inference_mode(model: onnx.ModelProto) -> tuple[int, list[str]]:
    """Set training-mode BNs to inference mode where no node reads their running statistics.

    Statistics that are main-graph outputs (`bnfold insert --training` writes them so) go with
    the training mode: those outputs are removed, and their names returned. A BN whose statistics
    a node or a subgraph's output reads stays as it is; so does per-activation BN (opset < 9
    spatial=0), which is no training mode.
    """
    opset, main = default_opset(model), model.graph
    read: set[str] = set()
    for graph in graphs(main):
        read.update(name for node in graph.node for name in node.input)
        if graph is not main:
            read.update(o.name for o in graph.output)
    outputs = {o.name for o in main.output}
    dropped: list[str] = []
    switched = 0
    for graph in graphs(main):
        for node in graph.node:
            statistics = [o for o in node.output[1:] if o]
            if (_is_bn(node) and training_reason(node, opset)
                    and not (opset < 9 and attr(node, "spatial", 1) == 0)
                    and not read.intersection(statistics)):
                dropped += [o for o in statistics if o in outputs]
                set_inference_mode(node)
                switched += 1
    gone = set(dropped)
    remove_where(main.output, lambda o: o.name in gone)
    remove_where(main.value_info, lambda v: v.name in gone)
    return switched, dropped


class _FoldRun:
    def __init__(self, model, base_dir, allow_initializer_inputs, lower_standalone, spill,
                 report: FoldReport):
        self.model, self.base_dir, self.report = model, base_dir, report
        self.allow_initializer_inputs = allow_initializer_inputs
        self.lower_standalone = lower_standalone
        self.inference = Inference(model)  # run when a rule first reads a shape or type
        self.names = NameAllocator(model)
        self.touched: set[str] = set()
        self.dropped: set[str] = set()
        if spill is None:
            spill = any(is_external(t) for t in model.graph.initializer)
        self.spill = Spill() if spill else None

    def view(self, graph: onnx.GraphProto, outer: Scope | None) -> GraphView:
        return GraphView(self.model, graph, outer=outer, base_dir=self.base_dir,
                         allow_initializer_inputs=self.allow_initializer_inputs,
                         inference=self.inference, names=self.names)

    def fold_graph(self, graph: onnx.GraphProto, outer: Scope | None, path: str) -> None:
        kept: dict[str, tuple] = {}  # output -> (name, op, Affine or None, reason)
        view = self.view(graph, outer)  # built once, refreshed after each scan
        affines: dict[int, tuple] = {}
        progress = True
        while progress:  # to a fixpoint: a fold can make another batch norm foldable
            progress = False
            # Plans are computed on this scan's snapshot; one that meets a value next to an
            # earlier rewrite of the scan waits for the next scan, on the refreshed view.
            dirty: set[str] = set()
            for aff in list(_batch_norms(view, affines)):
                if isinstance(aff, tuple):  # (node, op, reason): not a fixed affine map
                    node, op, reason = aff
                    kept[node.output[0]] = (display_name(node), op, None, reason)
                    continue
                if dirty and _near(view, aff.nodes, dirty):
                    continue  # what the rules read here may be stale: even a refusal
                result = self._plan(view, aff)
                if isinstance(result, str):
                    kept[aff.y] = (aff.name, aff.op, aff, result)
                    continue
                dirty |= result.values()
                kept.pop(aff.y, None)
                spill = self.spill if view.is_main else None  # save streams the main graph's
                Rewriter(view, self.names, self.touched, self.dropped, spill).apply(result)
                self.report.decisions.append(Decision(
                    node=aff.name, action="folded", direction=result.direction,
                    into=display_name(result.into), graph=path, op=aff.op,
                    nodes=[display_name(n) for n in aff.nodes], note=_one_channel(aff)))
                del result  # its new weights are in the model now: not twice in memory
                progress = True
            view.refresh()
        for name, op, aff, reason in kept.values():
            if aff is not None and op == "affine" and len(aff.nodes) < 2:
                continue  # a lone Add or Mul by a constant that stays is not worth a line
            action = "kept"
            if self.lower_standalone and aff is not None and op == "BatchNormalization":
                action = "lowered" if self._lower(view, aff) else "kept"
            self.report.decisions.append(Decision(
                node=name, action=action, reason=reason, graph=path, op=op,
                nodes=[display_name(n) for n in aff.nodes] if aff is not None else [name],
                note=_one_channel(aff)))
        view.refresh()
        for node in graph.node:  # (lowering only added names no subgraph can read)
            for attr_name, sub in subgraphs(node):
                self.fold_graph(sub, view.scope, f"{path}/{display_name(node)}:{attr_name}")

    @staticmethod
    def _plan(view: GraphView, aff: Affine) -> Plan | str:
        reasons = []
        for direction, rule in RULES:
            result = rule(view, aff)
            if isinstance(result, Plan):
                return result
            reasons.append(f"{direction}: {result}")
        return "; ".join(reasons)

    def _lower(self, view: GraphView, aff: Affine) -> bool:
        """Replace a BN that folds nowhere by Mul and Add with per-channel constants."""
        rank, data_type = view.rank(aff.x), view.elem_type(aff.x)
        if rank is None or rank < 2 or data_type is None:
            return False
        along = (-1,) + (1,) * (rank - 2)
        scale, shift = cast_to(aff.scale.reshape(along), data_type), cast_to(aff.shift.reshape(along), data_type)
        if isinstance(scale, str) or isinstance(shift, str):
            return False
        (bn,) = aff.nodes
        names = [self.names(f"{aff.name}/{role}") for role in ("scale", "shift", "scaled")]
        for name, value in zip(names, (scale, shift)):
            fill(view.add_initializer(name), value)
        if view.legacy_inputs:
            for name, value in zip(names, (scale, shift)):
                view.add_graph_input(helper.make_tensor_value_info(name, data_type,
                                                                   list(value.shape)))
        add = helper.make_node("Add", [names[2], names[1]], [aff.y],
                               name=self.names(f"{aff.name}/Add"))
        mul = helper.make_node("Mul", [aff.x, names[0]], [names[2]],
                               name=self.names(f"{aff.name}/Mul"))
        view.remove(bn)  # Mul then Add take its place
        view.insert_after(bn, mul)
        view.insert_after(bn, add)
        self.touched.update(aff.params)
        return True

    def collect_garbage(self) -> bool:
        """Remove the constants and value_info entries the rewrites left without a reader;
        whether a node went.

        A value is dead when a rewrite touched it and nothing reads it (no node input, no graph
        output, in any graph); a pure node whose outputs are all dead goes too, and its inputs
        may die in turn. Read counts are kept, so the cost is one walk of the model plus what
        dies; every list is then swept once.
        """
        all_graphs = list(graphs(self.model.graph))
        reads: dict[str, int] = {}
        producers: dict[str, list[onnx.NodeProto]] = {}
        for graph in all_graphs:
            for o in graph.output:
                reads[o.name] = reads.get(o.name, 0) + 1
            for node in graph.node:
                for name in node.input:
                    reads[name] = reads.get(name, 0) + 1
                for name in node.output:
                    producers.setdefault(name, []).append(node)
        dead: set[str] = set()
        doomed_nodes: dict[int, onnx.NodeProto] = {}
        pending = list(self.touched)
        while pending:
            name = pending.pop()
            if name in dead or reads.get(name, 0) or name not in self.touched:
                continue
            dead.add(name)
            for node in producers.get(name, ()):
                if id(node) in doomed_nodes or not _is_pure(node) \
                        or not all(o in dead for o in node.output):
                    continue
                doomed_nodes[id(node)] = node
                inputs = [n for n in node.input if n]
                self.touched.update(inputs)
                for n in node.input:
                    reads[n] -= 1
                pending.extend(inputs)
        for graph in all_graphs:
            is_legacy_main = graph is self.model.graph and self.model.ir_version < 4
            doomed = dead if is_legacy_main else dead - {i.name for i in graph.input}
            remove_where(graph.initializer, lambda t: t.name in doomed)
            if is_legacy_main:
                remove_where(graph.input, lambda i: i.name in doomed)
            remove_where(graph.node, lambda n: id(n) in doomed_nodes)
            remove_where(graph.value_info, lambda v: v.name in doomed)
        described = self.dropped.intersection(v.name for graph in all_graphs
                                              for v in graph.value_info)
        if described:  # value_info of values that may be gone: those that are go too
            produced: set[str] = set()
            for graph in all_graphs:
                produced.update(i.name for i in graph.input)
                produced.update(t.name for t in graph.initializer)
                for node in graph.node:
                    produced.update(node.output)
            gone = described - produced
            for graph in all_graphs:
                remove_where(graph.value_info, lambda v: v.name in gone)
        return bool(doomed_nodes)


def _one_channel(aff: Affine | None) -> str | None:
    """A warning for a BatchNormalization with one channel: a single scale and shift for all
    features, most likely a normalised axis of size 1 (Keras's axis=1 on [batch, 1, F])."""
    if aff is None or aff.op != "BatchNormalization" or aff.scale.size != 1:
        return None
    return "one channel: a single scale and shift for every feature (an axis of size 1?)"


def _is_pure(node: onnx.NodeProto) -> bool:
    """A node with no effect but its outputs: removable once nothing reads them."""
    return (node.domain in ("", "ai.onnx") and bool(node.output)
            and not any(True for _ in subgraphs(node)))
