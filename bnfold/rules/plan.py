"""A rewrite as data: rules compute a `Plan` (all checks passed, all tensors computed), and
`apply_plan` carries it out. Nothing is mutated until every check of a rule has passed."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from bnfold.errors import write_failure
from bnfold.graph import GraphView, NameAllocator
from bnfold.nodes import display_name, set_attr


@dataclass
class Plan:
    into: onnx.NodeProto  # the layer the affine map goes into
    direction: str  # "backward" or "forward"
    remove: list[onnx.NodeProto]  # the affine nodes
    tensors: list[tuple[onnx.NodeProto, int, np.ndarray, str]] = field(default_factory=list)
    attributes: list[tuple[onnx.NodeProto, str, Any]] = field(default_factory=list)
    rewire: list[tuple[onnx.NodeProto, int, str]] = field(default_factory=list)  # node.input[i]
    outputs: list[tuple[onnx.NodeProto, int, str]] = field(default_factory=list)  # node.output[i]
    # (after, bias, output): insert Add(after.output[0], bias) -> output right after `after`
    add_bias: tuple[onnx.NodeProto, np.ndarray, str] | None = None

    def set_tensor(self, node: onnx.NodeProto, index: int, values: np.ndarray, role: str) -> None:
        self.tensors.append((node, index, values, role))

    def values(self) -> set[str]:
        """Every tensor name next to a node this plan changes or removes."""
        nodes = [self.into, *self.remove] + [n for n, *_ in self.tensors + self.attributes
                                             + self.rewire + self.outputs]
        if self.add_bias is not None:
            nodes.append(self.add_bias[0])
        names: set[str] = set()
        for n in {id(n): n for n in nodes}.values():  # (the layer comes up more than once)
            names.update(n.input, n.output)
        names.discard("")
        return names


def fill(tensor: onnx.TensorProto, values: np.ndarray, spill: Spill | None = None) -> None:
    """Make `tensor` (name and doc kept) hold `values`: in memory, or in the spill file."""
    for data_field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                       "uint64_data", "string_data"):
        tensor.ClearField(data_field)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.data_type = helper.np_dtype_to_tensor_dtype(values.dtype)
    del tensor.dims[:]
    tensor.dims.extend(values.shape)
    if spill is not None and values.nbytes >= Spill.THRESHOLD:
        spill.write(tensor, values)
    else:
        tensor.raw_data = np.ascontiguousarray(values).tobytes()


class Spill:
    """Where new weights go when they should not stay in memory: written as they are made, so
    memory holds one layer at a time; `bnfold.save` streams them into the output.

    The scratch file goes in `directory`, by default the one `scratch_directory` names (the CLI
    names the output's stage folder, so nothing is written outside the output's folder and the
    stage removes it); with neither, in a fresh folder in TMPDIR removed when the process exits.
    """

    THRESHOLD = 1024  # bytes; smaller tensors stay in the model

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self._directory, self._owner = (directory, None) if directory is not None \
            else _SCRATCH.get()
        self._file = None

    def write(self, tensor: onnx.TensorProto, values: np.ndarray) -> None:
        if self._file is None:
            self._file = self._open()
        offset = self._file.tell()
        try:  # file.write, not ndarray.tofile, whose errors lose their errno
            self._file.write(memoryview(np.ascontiguousarray(values)).cast("B"))
            self._file.flush()
        except OSError as err:
            owner = self._owner or self._file.name
            raise write_failure(err, owner, os.path.dirname(self._file.name),
                                "scratch weights") from None
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self._file.name), ("offset", str(offset)),
                           ("length", str(values.nbytes))):
            tensor.external_data.add(key=key, value=value)

    def _open(self):
        if self._directory is not None:
            fd, path = tempfile.mkstemp(dir=self._directory, prefix="weights-", suffix=".bin")
            os.close(fd)
            return open(path, "r+b")
        directory = tempfile.mkdtemp(prefix="bnfold-")
        atexit.register(shutil.rmtree, directory, True)
        file = open(os.path.join(directory, "weights.bin"), "w+b")
        atexit.register(file.close)
        return file


_SCRATCH: ContextVar[tuple[str | None, str | None]] = ContextVar("bnfold_scratch_directory",
                                                                 default=(None, None))


@contextmanager
def scratch_directory(directory: str | os.PathLike | None,
                      owner: str | None = None) -> Iterator[None]:
    """Within the block, `Spill` writes its scratch file in `directory` (None: TMPDIR); its
    errors name `owner` (the output it is for)."""
    token = _SCRATCH.set((None if directory is None else os.fspath(directory), owner))
    try:
        yield
    finally:
        _SCRATCH.reset(token)


class Rewriter:
    """Applies plans to one graph, writing new constants without disturbing shared ones."""

    def __init__(self, view: GraphView, names: NameAllocator, touched: set[str],
                 dropped: set[str], spill: Spill | None = None):
        # touched: constants that may have lost their last reader; dropped: values that may no
        # longer exist. Both are cleaned up once at the end of the pass.
        self.view, self.names, self.touched, self.dropped = view, names, touched, dropped
        self.spill = spill

    def apply(self, plan: Plan) -> None:
        """Carry `plan` out through the view: the graph's node list and the index change at the
        view's next `refresh` (the rules of this scan read the scan's snapshot)."""
        view = self.view
        for node in plan.remove:
            self.touched.update(n for n in node.input if n)
            self.dropped.update(n for n in node.output if n)
            view.remove(node)
        for node, index, values, role in plan.tensors:
            self._set_tensor(node, index, values, role)
        for node, name, value in plan.attributes:
            set_attr(node, name, value)
        for node, index, name in plan.rewire:
            view.set_input(node, index, name)
        for node, index, name in plan.outputs:
            old = node.output[index]
            self.dropped.add(old)
            view.inference.alias(old, name)  # a new name: the same value
            view.set_output(node, index, name)
        if plan.add_bias is not None:
            after, bias, output = plan.add_bias
            bias_name = self._new_initializer(f"{display_name(after)}/bias", bias)
            add = helper.make_node("Add", [after.output[0], bias_name], [output],
                                   name=self.names(f"{display_name(after)}/bias_add"))
            view.insert_after(after, add)

    def _set_tensor(self, node: onnx.NodeProto, index: int, values: np.ndarray, role: str) -> None:
        old = node.input[index] if index < len(node.input) else ""
        if old and self._owned(old, node) and self._same_type(old, values):
            fill(self.view.scope.initializers[old], values, self.spill)
            return
        if old:
            self.touched.add(old)
        self.view.set_input(node, index, self._new_initializer(f"{display_name(node)}/{role}",
                                                                values))

    def _owned(self, name: str, node: onnx.NodeProto) -> bool:
        """True when `name` is an initializer of this graph that only `node` reads, once."""
        return (name in self.view.scope.initializers
                and list(node.input).count(name) == 1
                and name not in self.view.outputs
                and not self.view.is_graph_input(name)
                and [id(n) for n in self.view.users(name)] == [id(node)])

    def _same_type(self, name: str, values: np.ndarray) -> bool:
        tensor = self.view.scope.initializers[name]
        return (tuple(tensor.dims) == values.shape
                and tensor.data_type == helper.np_dtype_to_tensor_dtype(values.dtype))

    def _new_initializer(self, base: str, values: np.ndarray) -> str:
        name = self.names(base)
        fill(self.view.add_initializer(name), values, self.spill)
        if self.view.legacy_inputs:  # IR < 4: every initializer is also listed as an input
            self.view.add_graph_input(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(values.dtype), list(values.shape)))
        return name
