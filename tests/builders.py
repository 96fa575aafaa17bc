"""Tiny ONNX models, one builder per folding pattern, and the checks every fold test shares.

Builders return a checked `onnx.ModelProto` whose graph output is named "y" (unless said
otherwise), whose batch dimension is the symbolic "batch" (3 at run time) and whose BNs have
trained-looking parameters (`trained_bn_params`). Channel counts avoid 3 and 5 so that an axis
mix-up changes shapes or numbers instead of passing by accident.

The checks compare against onnxruntime with every graph optimization disabled: otherwise
onnxruntime fuses Conv+BN in the reference too and the comparison proves nothing.
"""

from __future__ import annotations

import collections
import copy

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

NP_DTYPE = {
    "fp32": np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "fp64": np.dtype(np.float64),
}
ONNX_DTYPE = {
    "fp32": TensorProto.FLOAT,
    "fp16": TensorProto.FLOAT16,
    "bf16": TensorProto.BFLOAT16,
    "fp64": TensorProto.DOUBLE,
}
DTYPE_NAME = {v: k for k, v in ONNX_DTYPE.items()}
# (atol, rtol): onnxruntime's own op-test tolerances, and tight ones for float64.
TOLERANCE = {
    "fp32": (1e-5, 1e-4),
    "fp16": (2.5e-3, 1e-3),
    "bf16": (2e-2, 1e-2),
    "fp64": (1e-10, 1e-8),
}
# Symbolic dimensions at run time: different from every channel count used in the builders.
DIMS = {"batch": 3, "seq": 5}
# Static spatial sizes per convolution rank (again, none equal to a channel count).
SPATIAL = {1: (11,), 2: (9, 7), 3: (7, 9, 11)}
BN = "BatchNormalization"


# --------------------------------------------------------------------------------------------
# Parameters


def trained_bn_params(C, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Float64 gamma (both signs), beta, mean and var in [0.3, 3]: far from an identity BN.

    `C` is a channel count, or a shape (opset-7 `spatial=0` BN takes `[C, H, W]` parameters).
    """
    shape = (C,) if isinstance(C, int) else tuple(C)
    sign = np.where(rng.random(shape) < 0.3, -1.0, 1.0)
    return {
        "scale": sign * rng.uniform(0.5, 2.0, shape),
        "bias": rng.normal(0.0, 1.0, shape),
        "mean": rng.normal(0.0, 1.0, shape),
        "var": rng.uniform(0.3, 3.0, shape),
    }


def bn_affine(params: dict[str, np.ndarray], epsilon: float = 1e-5):
    """The float64 (s, t) of `y = s * x + t` for BN parameters (after rounding to their dtype).
    `epsilon` is rounded to float32 first: BatchNormalization's attribute is a float32."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    s = p["scale"] / np.sqrt(p["var"] + np.float64(np.float32(epsilon)))
    return s, p["bias"] - p["mean"] * s


# --------------------------------------------------------------------------------------------
# A small graph builder


class GraphBuilder:
    """Accumulates nodes, initializers and inputs; `build()` infers the output types.

    `dtype` is the default float type of inputs and weights ("fp32", "fp16", "bf16", "fp64").
    """

    def __init__(self, dtype: str = "fp32", *, opset: int = 17, ir_version: int | None = None,
                 seed: int = 0, name: str = "graph"):
        self.dtype = dtype
        self.opset = opset
        min_ir = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
        self.ir_version = ir_version if ir_version is not None else max(min_ir, 4)
        self.rng = np.random.default_rng(seed)
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str] = []
        self.declared: dict[str, onnx.ValueInfoProto] = {}

    # values ------------------------------------------------------------------------------
    def input(self, name: str, shape, dtype: str | int | None = None) -> str:
        elem = dtype if isinstance(dtype, int) else ONNX_DTYPE[dtype or self.dtype]
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def const(self, name: str, array: np.ndarray, *, as_node: bool = False,
              as_input: bool = False) -> str:
        """An initializer (listed as graph input too with `as_input`) or a Constant node."""
        array = np.asarray(array)
        tensor = numpy_helper.from_array(array, name)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const",
                                               value=tensor))
        else:
            self.initializers.append(tensor)
            if as_input:
                self.inputs.append(helper.make_tensor_value_info(name, tensor.data_type,
                                                                 array.shape))
        return name

    def weight(self, name: str, shape, *, fan_in: int | None = None, dtype: str | None = None,
               source: str = "initializer") -> str:
        """A random weight with a He-like scale, so layer outputs stay of order 1."""
        shape = tuple(shape)
        fan_in = fan_in or max(1, int(np.prod(shape[1:])))
        array = self.rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        return self.value(name, array.astype(NP_DTYPE[dtype or self.dtype]), source)

    # nodes -------------------------------------------------------------------------------
    def node(self, op: str, inputs, *, name: str, outputs=None, **attrs):
        """Add a node; returns its output name (or the list of names when several)."""
        outputs = list(outputs) if outputs else [f"{name}_out"]
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=name, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def bn(self, x: str, C, *, name: str, out: str | None = None, params=None,
           dtype: str | None = None, mean_var_dtype: str | None = None, source: str = "initializer",
           n_outputs: int = 1, **attrs) -> str:
        """A BatchNormalization with trained parameters (float64 `params`, stored in `dtype`).

        `source`: where the parameters come from: "initializer", "constant" (Constant nodes), or
        "input:<key>" / "listed:<key>" (that one parameter is a plain graph input / an
        initializer also listed as graph input; the others are initializers).
        """
        params = trained_bn_params(C, self.rng) if params is None else params
        kind, _, only = source.partition(":")
        scale_dtype = dtype or self.dtype
        stats_dtype = mean_var_dtype or scale_dtype
        names = []
        for key in ("scale", "bias", "mean", "var"):
            value_dtype = stats_dtype if key in ("mean", "var") else scale_dtype
            array = np.asarray(params[key]).astype(NP_DTYPE[value_dtype])
            this = kind if key == only or not only else "initializer"
            names.append(self.value(f"{name}_{key}", array, this))
        outputs = [out or f"{name}_out"] + [f"{name}_out{i}" for i in range(1, n_outputs)]
        self.nodes.append(helper.make_node(BN, [x, *names], outputs, name=name, **attrs))
        return outputs[0]

    def value(self, name: str, array: np.ndarray, source: str) -> str:
        """A tensor from `source`: "initializer", "constant" (a Constant node), "listed"
        (initializer also listed as graph input) or "input" (graph input only: not constant)."""
        if source == "input":
            return self.input(name, list(array.shape), DTYPE_NAME[
                helper.np_dtype_to_tensor_dtype(array.dtype)])
        return self.const(name, array, as_node=source == "constant", as_input=source == "listed")

    def output(self, *names: str, declared: onnx.ValueInfoProto | None = None) -> None:
        """Graph outputs, typed by shape inference (or `declared` when inference falls short)."""
        self.outputs.extend(names)
        if declared is not None:
            self.declared[declared.name] = declared

    # models ------------------------------------------------------------------------------
    def subgraph(self, outputs: list[onnx.ValueInfoProto]) -> onnx.GraphProto:
        """This builder's nodes and initializers as a body graph (If/Loop) with given outputs."""
        return helper.make_graph(self.nodes, self.name, self.inputs, outputs, self.initializers)

    def build(self, *, value_info: bool = True) -> onnx.ModelProto:
        """The checked model. Output (and with `value_info`, intermediate) types are inferred."""
        inputs = list(self.inputs)
        if self.ir_version < 4:  # IR 3: every initializer must also be listed as graph input
            listed = {i.name for i in inputs}
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in self.initializers if t.name not in listed]
        opsets = [helper.make_opsetid("", self.opset)]
        draft = helper.make_model(
            helper.make_graph(self.nodes, self.name, inputs, [], self.initializers),
            opset_imports=opsets, ir_version=self.ir_version)
        inferred = {vi.name: vi for vi in
                    onnx.shape_inference.infer_shapes(draft, strict_mode=True).graph.value_info}
        inferred.update(self.declared)
        missing = [n for n in self.outputs if n not in inferred]
        assert not missing, f"builder bug: no type inferred for outputs {missing}"
        outputs = [inferred[n] for n in self.outputs]
        infos = [vi for n, vi in inferred.items() if n not in self.outputs] if value_info else []
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, self.initializers,
                                  value_info=infos)
        model = helper.make_model(graph, opset_imports=opsets, ir_version=self.ir_version,
                                  producer_name="bnfold-tests")
        onnx.checker.check_model(model, full_check=True)
        return model


def _conv_attrs(rank: int, kernel: int, pads: int, group: int = 1, strides: int = 1) -> dict:
    attrs = {"kernel_shape": [kernel] * rank, "pads": [pads] * (2 * rank)}
    if group != 1:
        attrs["group"] = group
    if strides != 1:
        attrs["strides"] = [strides] * rank
    return attrs


# --------------------------------------------------------------------------------------------
# Backward patterns: linear layer -> BN


def conv_bn(*, rank: int = 2, c_in: int = 4, c_out: int = 6, group: int = 1, bias: bool = True,
            kernel: int = 3, pads: int = 1, dtype: str = "fp32", opset: int = 17,
            ir_version: int | None = None, weights: str = "initializer",
            bn_params: str = "initializer", bn_values: dict | None = None,
            bn_dtype: str | None = None, mean_var_dtype: str | None = None, n_outputs: int = 1,
            expose: tuple[str, ...] = (), tail: str | None = None, seed: int = 0,
            **bn_attrs) -> onnx.ModelProto:
    """x[batch, c_in, *spatial] -> Conv(W[c_out, c_in/group, k...], B?) -> BN(c_out) [-> tail].

    `tail`: an op type applied to the BN output, or "bn" for a second BN ("bn2").
    `weights` / `bn_params`: where W, B / the BN parameters come from (`GraphBuilder.value`,
    `GraphBuilder.bn`). `bn_values`: float64 BN parameters instead of random trained ones.
    `n_outputs`: the BN's output count (extra ones "bn_out1", ...); `expose`: extra BN outputs to
    make graph outputs too, e.g. "bn_out1" (a used running mean).
    """
    b = GraphBuilder(dtype, opset=opset, ir_version=ir_version, seed=seed)
    x = b.input("x", ["batch", c_in, *SPATIAL[rank]])
    inputs = [x, b.weight("conv_W", [c_out, c_in // group] + [kernel] * rank, source=weights)]
    if bias:
        inputs.append(b.weight("conv_B", [c_out], fan_in=1, source=weights))
    y = b.node("Conv", inputs, name="conv", **_conv_attrs(rank, kernel, pads, group))
    y = b.bn(y, c_out, name="bn", out=None if tail else "y", params=bn_values, dtype=bn_dtype,
             mean_var_dtype=mean_var_dtype, source=bn_params, n_outputs=n_outputs, **bn_attrs)
    if tail == "bn":  # a second BN right after the first
        b.bn(y, c_out, name="bn2", out="y")
    elif tail:
        b.node(tail, [y], name="tail", outputs=["y"])
    b.output("y")
    stats_type = ONNX_DTYPE[mean_var_dtype or bn_dtype or dtype]
    for name in expose:  # BN-7/9 shape inference does not type the extra outputs
        b.output(name, declared=helper.make_tensor_value_info(name, stats_type, [c_out]))
    return b.build()


def conv_transpose_bn(*, rank: int = 2, c_in: int = 4, c_out: int = 6, group: int = 1,
                      bias: bool = True, kernel: int = 3, pads: int = 1, strides: int = 2,
                      dtype: str = "fp32", opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """x[batch, c_in, ...] -> ConvTranspose(W[c_in, c_out/group, k...], B?) -> BN(c_out)."""
    b = GraphBuilder(dtype, opset=opset, seed=seed)
    x = b.input("x", ["batch", c_in, *SPATIAL[rank]])
    inputs = [x, b.weight("convt_W", [c_in, c_out // group] + [kernel] * rank,
                          fan_in=(c_in // group) * kernel ** rank)]
    if bias:
        inputs.append(b.weight("convt_B", [c_out], fan_in=1))
    y = b.node("ConvTranspose", inputs, name="convt",
               **_conv_attrs(rank, kernel, pads, group, strides))
    b.bn(y, c_out, name="bn", out="y")
    b.output("y")
    return b.build()


def _gemm_c(b: GraphBuilder, c: str | None, m, n: int) -> list[str]:
    """Gemm's C input: None (absent), "scalar", "n", "1n", "m1" or "mn" (the last two: static M)."""
    if c is None:
        return []
    shape = {"scalar": [], "n": [n], "1n": [1, n], "m1": [m, 1], "mn": [m, n]}[c]
    return [b.weight("gemm_C", shape, fan_in=1)]


def _gemm_attrs(trans_a: int, trans_b: int, alpha: float, beta: float) -> dict:
    """Only non-default attributes: the pass must apply the spec defaults itself."""
    attrs = {}
    if trans_a:
        attrs["transA"] = 1
    if trans_b:
        attrs["transB"] = 1
    if alpha != 1.0:
        attrs["alpha"] = alpha
    if beta != 1.0:
        attrs["beta"] = beta
    return attrs


def gemm_bn(*, m="batch", k: int = 4, n: int = 6, trans_a: int = 0, trans_b: int = 0,
            alpha: float = 1.0, beta: float = 1.0, c: str | None = "n", dtype: str = "fp32",
            opset: int = 17, seed: int = 0, tail: str | None = None) -> onnx.ModelProto:
    """A[m, k] (or [k, m] with transA) -> Gemm(B, C) -> BN(n) [-> tail]."""
    b = GraphBuilder(dtype, opset=opset, seed=seed)
    a = b.input("a", [k, m] if trans_a else [m, k])
    w = b.weight("gemm_B", [n, k] if trans_b else [k, n], fan_in=k)
    y = b.node("Gemm", [a, w] + _gemm_c(b, c, m, n), name="gemm",
               **_gemm_attrs(trans_a, trans_b, alpha, beta))
    y = b.bn(y, n, name="bn", out=None if tail else "y")
    if tail:
        b.node(tail, [y], name="tail", outputs=["y"])
    b.output("y")
    return b.build()


def _add_bias(b: GraphBuilder, y: str, n: int, side: str | None, name: str = "add") -> str:
    """Add a constant bias [n] to `y`: on the "right" (Add(y, b)) or the "left" (Add(b, y))."""
    if side is None:
        return y
    bias = b.weight(f"{name}_B", [n], fan_in=1)
    return b.node("Add", [y, bias] if side == "right" else [bias, y], name=name)


def matmul_bn(*, k: int = 4, n: int = 6, bias: str | None = None, dtype: str = "fp32",
              opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """x[batch, k] -> MatMul(W[k, n]) [-> Add(bias)] -> BN(n): the Dense export (rank 2)."""
    b = GraphBuilder(dtype, opset=opset, seed=seed)
    x = b.input("x", ["batch", k])
    y = b.node("MatMul", [x, b.weight("mm_W", [k, n], fan_in=k)], name="matmul")
    y = _add_bias(b, y, n, bias)
    b.bn(y, n, name="bn", out="y")
    b.output("y")
    return b.build()


def matmul3d_bn_on_seq(*, t: int = 7, k: int = 4, n: int = 6, bias: str | None = None,
                       seed: int = 0) -> onnx.ModelProto:
    """x[batch, t, k] -> MatMul(W[k, n]) [-> Add] -> BN(t): BN's axis 1 is T, not the features."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["batch", t, k])
    y = b.node("MatMul", [x, b.weight("mm_W", [k, n], fan_in=k)], name="matmul")
    y = _add_bias(b, y, n, bias)
    b.bn(y, t, name="bn", out="y")
    b.output("y")
    return b.build()


# --------------------------------------------------------------------------------------------
# Forward patterns: [activation or graph input] -> BN -> linear layer


def _activation(b: GraphBuilder, x: str, act: str | None) -> str:
    return b.node(act, [x], name="act") if act else x


def bn_gemm(*, act: str | None = "Relu", k: int = 4, n: int = 6, trans_b: int = 0,
            alpha: float = 1.0, beta: float = 1.0, c: str | None = "n", dtype: str = "fp32",
            expose_bn: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[batch, k] [-> act] -> BN(k) -> Gemm(B, C) -> y[batch, n] (and BN's output "bn_out" is a
    graph output too with `expose_bn`)."""
    b = GraphBuilder(dtype, seed=seed)
    x = _activation(b, b.input("x", ["batch", k]), act)
    x = b.bn(x, k, name="bn")
    w = b.weight("gemm_B", [n, k] if trans_b else [k, n], fan_in=k)
    b.node("Gemm", [x, w] + _gemm_c(b, c, "batch", n), name="gemm", outputs=["y"],
           **_gemm_attrs(0, trans_b, alpha, beta))
    b.output("y", *([x] if expose_bn else []))
    return b.build()


def bn_matmul(*, act: str | None = "Relu", k: int = 4, n: int = 6, bias: str | None = "right",
              dtype: str = "fp32", seed: int = 0) -> onnx.ModelProto:
    """x[batch, k] [-> act] -> BN(k) -> MatMul(W[k, n]) [-> Add(bias)] -> y."""
    b = GraphBuilder(dtype, seed=seed)
    x = _activation(b, b.input("x", ["batch", k]), act)
    x = b.bn(x, k, name="bn")
    y = b.node("MatMul", [x, b.weight("mm_W", [k, n], fan_in=k)], name="matmul")
    y = _add_bias(b, y, n, bias)
    b.node("Identity", [y], name="out", outputs=["y"])
    b.output("y")
    return b.build()


def bn_conv(*, act: str | None = "Relu", c_in: int = 4, c_out: int = 6, group: int = 1,
            bias: bool = True, kernel: int = 3, pads: int = 0, auto_pad: str | None = None,
            zero_shift: bool = False, dtype: str = "fp32", seed: int = 0) -> onnx.ModelProto:
    """x[batch, c_in, 9, 7] [-> act] -> BN(c_in) -> Conv(group, pads or auto_pad) -> y.

    `zero_shift`: mean = beta = 0, so the BN only scales (t = beta - mean * s is exactly 0).
    """
    b = GraphBuilder(dtype, seed=seed)
    x = _activation(b, b.input("x", ["batch", c_in, *SPATIAL[2]]), act)
    params = trained_bn_params(c_in, b.rng)
    if zero_shift:
        params["mean"] = np.zeros(c_in)
        params["bias"] = np.zeros(c_in)
    x = b.bn(x, c_in, name="bn", params=params)
    inputs = [x, b.weight("conv_W", [c_out, c_in // group, kernel, kernel])]
    if bias:
        inputs.append(b.weight("conv_B", [c_out], fan_in=1))
    attrs = _conv_attrs(2, kernel, pads, group)
    if auto_pad:
        del attrs["pads"]
        attrs["auto_pad"] = auto_pad
    b.node("Conv", inputs, name="conv", outputs=["y"], **attrs)
    b.output("y")
    return b.build()


def conv_relu_bn_flatten_gemm(*, via: str = "Flatten", trans_b: int = 1, c: int = 4,
                              n: int = 10, seed: int = 0) -> onnx.ModelProto:
    """x -> Conv(pads 0) -> Relu -> BN(c) -> Flatten | Reshape -> Gemm -> y.

    `via`: "Flatten" (axis 1), "Reshape0" (shape [0, -1]) or "Reshape" (shape [-1, C*H*W]).
    The BN's channel c becomes the feature block c*H*W ... (c+1)*H*W - 1 (H = 6, W = 7).
    """
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["batch", 2, 8, 9])
    y = b.node("Conv", [x, b.weight("conv_W", [c, 2, 3, 3]), b.weight("conv_B", [c], fan_in=1)],
               name="conv", kernel_shape=[3, 3])
    y = b.node("Relu", [y], name="relu")
    y = b.bn(y, c, name="bn")
    features = c * 6 * 7
    if via == "Flatten":
        y = b.node("Flatten", [y], name="flatten", axis=1)
    else:
        shape = [0, -1] if via == "Reshape0" else [-1, features]
        y = b.node("Reshape", [y, b.const("flat_shape", np.array(shape, dtype=np.int64))],
                   name="reshape")
    w = b.weight("gemm_B", [n, features] if trans_b else [features, n], fan_in=features)
    b.node("Gemm", [y, w, b.weight("gemm_C", [n], fan_in=1)], name="gemm", outputs=["y"],
           **_gemm_attrs(0, trans_b, 1.0, 1.0))
    b.output("y")
    return b.build()


def _dense(b: GraphBuilder, x: str, k: int, n: int, kind: str, name: str) -> str:
    """A Dense layer as torch exports it ("gemm", transB=1) or as Keras/tf2onnx ("matmul_add")."""
    if kind == "gemm":
        return b.node("Gemm", [x, b.weight(f"{name}_W", [n, k], fan_in=k),
                               b.weight(f"{name}_B", [n], fan_in=1)], name=name, transB=1)
    y = b.node("MatMul", [x, b.weight(f"{name}_W", [k, n], fan_in=k)], name=f"{name}_matmul")
    return _add_bias(b, y, n, "right", name=f"{name}_add")


def keras_mlp(*, dense: str = "matmul_add", seed: int = 0) -> onnx.ModelProto:
    """The seed example: Dense(5->16) Relu Dense(16->32) Relu BN(eps 1e-3) Dense(32->2) Softmax."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["batch", 5])
    x = b.node("Relu", [_dense(b, x, 5, 16, dense, "dense1")], name="relu1")
    x = b.node("Relu", [_dense(b, x, 16, 32, dense, "dense2")], name="relu2")
    x = b.bn(x, 32, name="bn", epsilon=1e-3)
    b.node("Softmax", [_dense(b, x, 32, 2, dense, "dense3")], name="softmax", outputs=["y"])
    b.output("y")
    return b.build()


# --------------------------------------------------------------------------------------------
# Patterns that must not fold


def conv_bn_shared_output(*, also: str, seed: int = 0) -> onnx.ModelProto:
    """x -> Conv -> c -> BN -> y, where c is also read by a Relu (`also="consumer"`, output "z")
    or is itself a graph output (`also="output"`)."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["batch", 4, *SPATIAL[2]])
    c = b.node("Conv", [x, b.weight("conv_W", [6, 4, 3, 3]), b.weight("conv_B", [6], fan_in=1)],
               name="conv", **_conv_attrs(2, 3, 1))
    b.bn(c, 6, name="bn", out="y")
    if also == "consumer":
        b.node("Relu", [c], name="relu", outputs=["z"])
        b.output("y", "z")
    else:
        b.output("y", c)
    return b.build()


def conv_bn_per_activation(*, seed: int = 0) -> onnx.ModelProto:
    """Opset 7: Conv -> BN(spatial=0), whose parameters are per activation: [C, H, W]."""
    b = GraphBuilder(opset=7, seed=seed)
    x = b.input("x", ["batch", 4, *SPATIAL[2]])
    y = b.node("Conv", [x, b.weight("conv_W", [6, 4, 3, 3]), b.weight("conv_B", [6], fan_in=1)],
               name="conv", **_conv_attrs(2, 3, 1))
    b.bn(y, (6, *SPATIAL[2]), name="bn", out="y", spatial=0)
    b.output("y")
    return b.build()


def act_bn_tail(*, act: str | None = "Relu", tail: str | None = "Softmax", k: int = 4,
                seed: int = 0) -> onnx.ModelProto:
    """x[batch, k] [-> act] -> BN(k) [-> tail] -> y: nothing linear on either side."""
    b = GraphBuilder(seed=seed)
    x = _activation(b, b.input("x", ["batch", k]), act)
    y = b.bn(x, k, name="bn", out=None if tail else "y")
    if tail:
        b.node(tail, [y], name="tail", outputs=["y"])
    b.output("y")
    return b.build()


def bn_gemm_trans_a(*, k: int = 4, m: int = 7, n: int = 6, seed: int = 0) -> onnx.ModelProto:
    """x[k, m] -> Relu -> BN(m) -> Gemm(transA=1, B[k, n]) -> y[m, n]: BN normalises Gemm's
    M axis (axis 1 of A is not A's feature axis when transA=1)."""
    b = GraphBuilder(seed=seed)
    x = b.node("Relu", [b.input("x", [k, m])], name="act")
    x = b.bn(x, m, name="bn")
    b.node("Gemm", [x, b.weight("gemm_B", [k, n], fan_in=k), b.weight("gemm_C", [n], fan_in=1)],
           name="gemm", outputs=["y"], transA=1)
    b.output("y")
    return b.build()


def bn_matmul3d(*, t: int = 7, k: int = 4, n: int = 6, seed: int = 0) -> onnx.ModelProto:
    """x[batch, t, k] -> Relu -> BN(t) -> MatMul(W[k, n]) -> y: BN normalises T, MatMul
    contracts K."""
    b = GraphBuilder(seed=seed)
    x = b.node("Relu", [b.input("x", ["batch", t, k])], name="act")
    x = b.bn(x, t, name="bn")
    b.node("MatMul", [x, b.weight("mm_W", [k, n], fan_in=k)], name="matmul", outputs=["y"])
    b.output("y")
    return b.build()


# --------------------------------------------------------------------------------------------
# Larger structures


def conv_bn_relu_bn_conv(*, first_bn_training: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x -> Conv -> BN -> Relu -> BN -> Conv(pads 0) -> y: both BNs can go (back, then forward).

    `first_bn_training`: the first BN is in training mode (opset 15, training_mode=1).
    """
    b = GraphBuilder(opset=15 if first_bn_training else 17, seed=seed)
    x = b.input("x", ["batch", 2, *SPATIAL[2]])
    y = b.node("Conv", [x, b.weight("conv1_W", [6, 2, 3, 3]),
                        b.weight("conv1_B", [6], fan_in=1)], name="conv1",
               **_conv_attrs(2, 3, 1))
    training = {"training_mode": 1, "n_outputs": 3} if first_bn_training else {}
    y = b.bn(y, 6, name="bn1", **training)
    y = b.node("Relu", [y], name="relu")
    y = b.bn(y, 6, name="bn2")
    b.node("Conv", [y, b.weight("conv2_W", [4, 6, 3, 3]), b.weight("conv2_B", [4], fan_in=1)],
           name="conv2", outputs=["y"], **_conv_attrs(2, 3, 0))
    b.output("y")
    return b.build()


def shared_weight_convs(*, both_bn: bool, seed: int = 0) -> onnx.ModelProto:
    """x -> Conv_a(W, B) -> BN_a -> ya and x -> Conv_b(W, B) [-> BN_b] -> yb: W and B shared."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["batch", 4, *SPATIAL[2]])
    w, bias = b.weight("shared_W", [6, 4, 3, 3]), b.weight("shared_B", [6], fan_in=1)
    ya = b.node("Conv", [x, w, bias], name="conv_a", **_conv_attrs(2, 3, 1))
    b.bn(ya, 6, name="bn_a", out="ya")
    if both_bn:
        yb = b.node("Conv", [x, w, bias], name="conv_b", **_conv_attrs(2, 3, 1))
        b.bn(yb, 6, name="bn_b", out="yb")
    else:
        b.node("Conv", [x, w, bias], name="conv_b", outputs=["yb"], **_conv_attrs(2, 3, 1))
    b.output("ya", "yb")
    return b.build()


def if_bn(*, seed: int = 0) -> onnx.ModelProto:
    """If(cond) with Conv -> BN in both branches, reading x from the outer scope.

    then: weights and BN parameters are main-graph initializers (outer scope);
    else: weights are body initializers and BN parameters are Constant nodes in the body.
    """
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["batch", 4, *SPATIAL[2]])
    cond = b.input("cond", [], TensorProto.BOOL)
    out_info = [helper.make_tensor_value_info("branch_out_then", TensorProto.FLOAT,
                                              ["batch", 6, *SPATIAL[2]])]

    then = GraphBuilder(seed=seed + 1, name="then_body")
    y = then.node("Conv", [x, b.weight("then_W", [6, 4, 3, 3]),
                           b.weight("then_B", [6], fan_in=1)], name="then_conv",
                  **_conv_attrs(2, 3, 1))
    params = trained_bn_params(6, b.rng)
    names = [b.const(f"then_bn_{k}", params[k].astype(np.float32)) for k in params]
    then.nodes.append(helper.make_node(BN, [y, *names], ["branch_out_then"], name="then_bn"))

    other = GraphBuilder(seed=seed + 2, name="else_body")
    y = other.node("Conv", [x, other.weight("else_W", [6, 4, 3, 3])], name="else_conv",
                   **_conv_attrs(2, 3, 1))
    other.bn(y, 6, name="else_bn", out="branch_out_else", source="constant")
    else_info = [helper.make_tensor_value_info("branch_out_else", TensorProto.FLOAT,
                                               ["batch", 6, *SPATIAL[2]])]

    b.node("If", [cond], name="if", outputs=["y"], then_branch=then.subgraph(out_info),
           else_branch=other.subgraph(else_info))
    b.output("y")
    return b.build()


def loop_bn(*, trips: int = 2, seed: int = 0) -> onnx.ModelProto:
    """Loop(trips) whose body is v -> Conv(pads 1, weight from the outer scope) -> BN -> Relu."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["batch", 4, *SPATIAL[2]])
    w = b.weight("body_W", [4, 4, 3, 3])
    trip_count = b.const("trips", np.array(trips, dtype=np.int64))
    keep_going = b.const("keep_going", np.array(True))

    body = GraphBuilder(seed=seed + 1, name="loop_body")
    body.input("i", [], TensorProto.INT64)
    body.input("cond_in", [], TensorProto.BOOL)
    body.input("v_in", ["batch", 4, *SPATIAL[2]])
    y = body.node("Conv", ["v_in", w, body.weight("body_B", [4], fan_in=1)], name="body_conv",
                  **_conv_attrs(2, 3, 1))
    y = body.bn(y, 4, name="body_bn")
    body.node("Relu", [y], name="body_relu", outputs=["v_out"])
    body.node("Identity", ["cond_in"], name="body_cond", outputs=["cond_out"])
    graph = body.subgraph([
        helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
        helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["batch", 4, *SPATIAL[2]]),
    ])
    b.node("Loop", [trip_count, keep_going, x], name="loop", outputs=["y"], body=graph)
    b.output("y", declared=helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                          ["batch", 4, *SPATIAL[2]]))
    return b.build()


# --------------------------------------------------------------------------------------------
# Running and comparing


def count_ops(model: onnx.ModelProto | onnx.GraphProto) -> collections.Counter:
    """op_type -> number of nodes, subgraphs (If/Loop/Scan bodies) included."""
    counts: collections.Counter = collections.Counter()
    for graph in _graphs(model.graph if isinstance(model, onnx.ModelProto) else model):
        counts.update(n.op_type for n in graph.node)
    return counts


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = 1  # tiny models: threads only cost start-up time
    return options


def run_unoptimised(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """All outputs by name, from onnxruntime on CPU with every graph optimization disabled."""
    session = ort.InferenceSession(model.SerializeToString(), _session_options(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def run_model(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """`run_unoptimised`; bf16 models run upcast to float32 (onnxruntime's CPU has no bf16
    kernels), and models onnxruntime has no kernel for (fp64 Conv, BN-15 with float64 mean/var)
    run in onnx's reference evaluator."""
    if _has_type(model, TensorProto.BFLOAT16):
        model = upcast(model, TensorProto.BFLOAT16)
        feeds = {k: v.astype(np.float32) if v.dtype == NP_DTYPE["bf16"] else v
                 for k, v in feeds.items()}
    try:
        return run_unoptimised(model, feeds)
    except Exception as err:  # noqa: BLE001 - only "no kernel" falls back, see below
        if "NOT_IMPLEMENTED" not in str(err):
            raise
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model)
    names = [o.name for o in model.graph.output]
    return dict(zip(names, evaluator.run(names, feeds)))


def _has_type(model: onnx.ModelProto, elem: int) -> bool:
    for graph in _graphs(model.graph):
        values = list(graph.input) + list(graph.output) + list(graph.value_info)
        if any(v.type.tensor_type.elem_type == elem for v in values):
            return True
        if any(t.data_type == elem for t in graph.initializer):
            return True
        for node in graph.node:
            if any(a.type == onnx.AttributeProto.TENSOR and a.t.data_type == elem
                   for a in node.attribute):
                return True
    return False


def upcast(model: onnx.ModelProto, elem: int, to: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A copy of `model` with every tensor of type `elem` (fp16/bf16) converted exactly to `to`.

    Computes what the model's stored parameters mean, without intermediate rounding.
    """
    model = copy.deepcopy(model)
    target = helper.tensor_dtype_to_np_dtype(to)

    def convert(tensor: onnx.TensorProto) -> None:
        if tensor.data_type == elem:
            tensor.CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(tensor).astype(target), tensor.name))

    for graph in _graphs(model.graph):
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.tensor_type.elem_type == elem:
                vi.type.tensor_type.elem_type = to
        for tensor in graph.initializer:
            convert(tensor)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    convert(attr.t)
                if node.op_type == "Cast" and attr.name == "to" and attr.i == elem:
                    attr.i = to
    return model


def _initializer_names(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer}


def feedable_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller must feed: those without an initializer."""
    inits = _initializer_names(model.graph)
    return [i for i in model.graph.input if i.name not in inits]


def random_feeds(model: onnx.ModelProto, seed: int = 0, dims: dict | None = None) -> dict:
    """Seeded random values for every input without initializer; symbolic dims from DIMS/dims."""
    sizes = {**DIMS, **(dims or {})}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in feedable_inputs(model):
        tensor_type = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else sizes.get(d.dim_param, 3)
                 for d in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if dtype == np.bool_:
            feeds[vi.name] = np.asarray(rng.random(shape) < 0.5)
        elif np.issubdtype(dtype, np.integer):
            feeds[vi.name] = np.asarray(rng.integers(0, 4, shape)).astype(dtype)
        else:
            feeds[vi.name] = np.asarray(rng.uniform(-2.0, 2.0, shape)).astype(dtype)
    return feeds


def dtype_name(model: onnx.ModelProto) -> str:
    """The name ("fp32", ...) of the first float graph output's type: picks the tolerance."""
    for out in model.graph.output:
        name = DTYPE_NAME.get(out.type.tensor_type.elem_type)
        if name:
            return name
    return "fp32"


def compare(actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> str | None:
    """None when |a - b| <= atol + rtol * |b| in float64 everywhere (NaN and inf must match),
    else a one-line description with the max errors and the smallest passing atol and rtol."""
    a = np.asarray(actual).astype(np.float64)
    b = np.asarray(expected).astype(np.float64)
    if a.shape != b.shape:
        return f"shape {a.shape} != {b.shape}"
    special = ~np.isfinite(a) | ~np.isfinite(b)
    same_special = (np.isnan(a) & np.isnan(b)) | (a == b)
    if np.any(special & ~same_special):
        return f"NaN/inf differ at {int(np.sum(special & ~same_special))} positions"
    a, b = a[~special], b[~special]
    if a.size == 0:
        return None
    err = np.abs(a - b)
    if np.all(err <= atol + rtol * np.abs(b)):
        return None
    rel = err / np.maximum(np.abs(b), np.finfo(np.float64).tiny)
    need_atol = float(np.max(err - rtol * np.abs(b)))
    need_rtol = float(np.max((err - atol) / np.maximum(np.abs(b), np.finfo(np.float64).tiny)))
    return (f"max abs {err.max():.3g}, max rel {rel.max():.3g}; needs atol {need_atol:.3g} "
            f"(rtol {rtol:g}) or rtol {need_rtol:.3g} (atol {atol:g})")


def assert_equivalent(original: onnx.ModelProto, folded: onnx.ModelProto, feeds: dict,
                      dtype: str | None = None) -> None:
    """Every output of `folded` matches `original` (same names, dtypes, shapes, values)."""
    atol, rtol = TOLERANCE[dtype or dtype_name(original)]
    expected = run_model(original, feeds)
    actual = run_model(folded, feeds)
    assert set(actual) == set(expected), f"outputs {sorted(actual)} != {sorted(expected)}"
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, f"{name}: {actual[name].dtype} != {value.dtype}"
        problem = compare(actual[name], value, atol, rtol)
        assert problem is None, f"output {name} (atol {atol:g}, rtol {rtol:g}): {problem}"


def _interface(model: onnx.ModelProto):
    def describe(vi):
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        return vi.name, t.elem_type, dims if t.HasField("shape") else None

    return ([describe(i) for i in feedable_inputs(model)],
            [describe(o) for o in model.graph.output])


def assert_interface_unchanged(original: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    """Same feedable inputs and outputs: names, order, element types and shapes."""
    before, after = _interface(original), _interface(folded)
    assert after[0] == before[0], f"inputs changed: {before[0]} -> {after[0]}"
    assert after[1] == before[1], f"outputs changed: {before[1]} -> {after[1]}"


def tensor_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The value of a constant (initializer or Constant node, any graph) named `name`."""
    for graph in _graphs(model.graph):
        for t in graph.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
        for node in graph.node:
            if node.op_type == "Constant" and node.output[0] == name:
                return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


def find_node(model: onnx.ModelProto, op_type: str, index: int = 0) -> onnx.NodeProto:
    nodes = [n for g in _graphs(model.graph) for n in g.node if n.op_type == op_type]
    assert len(nodes) > index, f"no {op_type} #{index} in the model"
    return nodes[index]


def producer(model: onnx.ModelProto, value: str) -> onnx.NodeProto | None:
    for graph in _graphs(model.graph):
        for node in graph.node:
            if value in node.output:
                return node
    return None


def unused_constants(model: onnx.ModelProto) -> set[str]:
    """Initializers and Constant outputs that no node reads and that are no graph output.

    Initializers listed as graph inputs are part of the interface and not counted.
    """
    used, defined = set(), set()
    for graph in _graphs(model.graph):
        used.update(i for n in graph.node for i in n.input)
        used.update(o.name for o in graph.output)
        listed = {i.name for i in graph.input}
        defined.update(t.name for t in graph.initializer if t.name not in listed)
        defined.update(n.output[0] for n in graph.node if n.op_type == "Constant")
    return defined - used


def ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """The spacing of `dtype` at each value (float64 result)."""
    v = np.abs(np.asarray(values, dtype=np.float64))
    info = ml_dtypes.finfo(NP_DTYPE[dtype]) if dtype == "bf16" else np.finfo(NP_DTYPE[dtype])
    exponent = np.floor(np.log2(np.maximum(v, float(info.smallest_normal))))
    return 2.0 ** (exponent - info.nmant)


def assert_rounded_from(stored: np.ndarray, exact: np.ndarray, dtype: str) -> None:
    """`stored` (in `dtype`) is the float64 value `exact` rounded to nearest: within half an ulp."""
    assert stored.dtype == NP_DTYPE[dtype], f"stored as {stored.dtype}, not {dtype}"
    err = np.abs(stored.astype(np.float64) - exact)
    half = 0.5 * ulp(exact, dtype) * (1 + 1e-9)
    worst = float(np.max(err / half)) if err.size else 0.0
    assert np.all(err <= half), f"not rounded to nearest from float64: {worst:.3g} half-ulps off"


def assert_no_less_accurate(original: onnx.ModelProto, folded: onnx.ModelProto, feeds: dict,
                            dtype: str) -> None:
    """Against a float64 evaluation of `original` (its stored parameters, no rounding), the folded
    model's max error is not larger than the original's own, up to one ulp (in `dtype`) of the
    output's largest magnitude.

    Why the ulp: storing W*s rounds each weight once, an error the original does not have (it
    rounds its Conv output instead), so even a correctly rounded fold is worse on some inputs
    and better on others, by a fraction of an output ulp. A fold computed in low precision, or
    one that flushes, saturates or mis-scales, is off by many ulps.
    """
    elem = ONNX_DTYPE[dtype]
    wide = {k: v.astype(np.float64) if v.dtype == NP_DTYPE[dtype] else v for k, v in feeds.items()}
    exact = run_model(upcast(original, elem, TensorProto.DOUBLE), wide)
    own, candidate = run_model(original, feeds), run_model(folded, feeds)
    for name, ref in exact.items():
        own_err = float(np.max(np.abs(own[name].astype(np.float64) - ref)))
        folded_err = float(np.max(np.abs(candidate[name].astype(np.float64) - ref)))
        slack = float(ulp(np.max(np.abs(ref)), dtype))
        assert folded_err <= own_err + slack, (
            f"{name}: folded max error {folded_err:.3g} > original's {own_err:.3g} "
            f"+ one {dtype} ulp {slack:.3g}")


def fold_checked(model: onnx.ModelProto, feeds=None, *, dtype: str | None = None,
                 reference: onnx.ModelProto | None = None, **options):
    """Run `fold(model, **options)` and assert what every fold result must satisfy.

    - the input model is not mutated;
    - the result passes `onnx.checker.check_model(full_check=True)`;
    - the interface (feedable inputs, outputs: names, types, shapes) is unchanged;
    - every BN has a decision, and exactly the folded ones are gone;
    - no dead constants are left behind (unused BN parameters are removed);
    - the outputs agree with `reference` (default: the original) in unoptimised onnxruntime,
      on `feeds` (a dict or a list of dicts; default `random_feeds(model)`).
    """
    from bnfold.fold import fold

    snapshot = model.SerializeToString()
    folded, report = fold(model, **options)
    assert model.SerializeToString() == snapshot, "fold mutated its input model"
    onnx.checker.check_model(folded, full_check=True)
    assert_interface_unchanged(model, folded)
    bn_before = count_ops(model)[BN]
    bn_decisions = [d for d in report.decisions if d.op == BN]
    assert len(bn_decisions) == bn_before, f"{len(bn_decisions)} decisions for {bn_before} BNs"
    removed = [d for d in bn_decisions if d.action in ("folded", "lowered")]
    assert count_ops(folded)[BN] == bn_before - len(removed), "folded BNs must be gone"
    left = unused_constants(folded) - unused_constants(model)
    assert not left, f"dead constants left in the folded model: {sorted(left)}"
    feeds_list = feeds if isinstance(feeds, list) else [feeds or random_feeds(model)]
    for f in feeds_list:
        assert_equivalent(reference or model, folded, f, dtype)
    return folded, report


def folds(report) -> list[tuple[str, str, str | None]]:
    """(BN node, direction, layer folded into) for every folded BN, sorted."""
    return sorted((d.node, d.direction, d.into) for d in report.folded if d.op == BN)


def stored_bn_params(model: onnx.ModelProto, prefix: str = "bn") -> dict[str, np.ndarray]:
    """The BN parameters as stored in `model` by `GraphBuilder.bn(name=prefix)`."""
    return {k: tensor_value(model, f"{prefix}_{k}") for k in ("scale", "bias", "mean", "var")}


def kept_reason(report) -> str:
    """The reason of the one kept BN (and nothing folded)."""
    assert not report.folded, f"unexpected folds: {[d.describe() for d in report.folded]}"
    kept = [d for d in report.kept if d.op == BN]
    assert len(kept) == 1, [d.describe() for d in report.decisions]
    assert kept[0].reason, "a kept BN must say why"
    return kept[0].reason


# --------------------------------------------------------------------------------------------
# Affine chains: batch norm as exporters decompose it (Sub/Mul/Add/Div by constants, Casts)

# Each form is the op sequence of the chain; "RSub" is Sub with the constant first (c - x).
CHAIN_FORMS = {
    "sub_mul_add": ("Sub", "Mul", "Add"),
    "mul_add": ("Mul", "Add"),
    "add_mul": ("Add", "Mul"),
    "div": ("Div",),
    "rsub": ("RSub",),
    "sub_div_mul_add": ("Sub", "Div", "Mul", "Add"),  # (x - mean) / sqrt(var + eps) * g + b
}


def chain_constant(op: str, shape, rng: np.random.Generator) -> np.ndarray:
    """A float64 constant of `shape` for one chain step: scales (Mul, Div) have both signs and
    magnitudes in [0.5, 2], never near 0; shifts (Add, Sub, RSub) are N(0, 1)."""
    shape = tuple(shape)
    if op in ("Mul", "Div"):
        return np.where(rng.random(shape) < 0.3, -1.0, 1.0) * rng.uniform(0.5, 2.0, shape)
    return rng.normal(0.0, 1.0, shape)


def noop_cast(b: GraphBuilder, x: str, name: str, dtype: str | None = None) -> str:
    """Cast `x` to its own float type (`dtype`, default the builder's): a no-op."""
    return b.node("Cast", [x], name=name, to=ONNX_DTYPE[dtype or b.dtype])


def affine_chain(b: GraphBuilder, x: str, ops, shape, *, name: str = "chain",
                 out: str | None = None, casts: bool = False, source: str = "initializer",
                 constants: list | None = None, left: bool = False) -> str:
    """x -> [Cast ->] op_1(x, c_1) -> [Cast ->] op_2 -> ... -> out: a decomposed batch norm.

    `ops`: names from `CHAIN_FORMS` values ("Sub", "Mul", "Add", "Div", "RSub"); `shape`: the
    shape of every constant, or one shape per op; `constants`: float64 values instead of
    `chain_constant` ones. `casts`: a no-op Cast before every step (`noop_casts` counts them).
    `source`: "initializer", "constant" (Constant nodes), "identity" (Identity of an
    initializer, as TorchScript writes shared tensors). `left`: constant first for Mul and Add.
    """
    ops = list(ops)
    shapes = shape if shape and isinstance(shape[0], (tuple, list)) else [shape] * len(ops)
    for i, op in enumerate(ops):
        if casts:
            x = noop_cast(b, x, f"{name}_cast{i}")
        value = constants[i] if constants is not None else chain_constant(op, shapes[i], b.rng)
        array = np.asarray(value).astype(NP_DTYPE[b.dtype])
        if source == "identity":
            c = b.node("Identity", [b.const(f"{name}_c{i}_shared", array)], name=f"{name}_c{i}_id")
        else:
            c = b.value(f"{name}_c{i}", array, source)
        op_type = "Sub" if op == "RSub" else op
        inputs = [c, x] if op == "RSub" or (left and op in ("Mul", "Add")) else [x, c]
        last = i == len(ops) - 1
        x = b.node(op_type, inputs, name=f"{name}_{op.lower()}{i}",
                   outputs=[out] if last and out else None)
    return x


def noop_casts(model: onnx.ModelProto, *, graph_outputs_only: bool = False) -> int:
    """Casts of the main graph whose target type is their input's own type (types from shape
    inference); with `graph_outputs_only`, only those producing a graph output."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.input) + list(inferred.graph.value_info) +
             list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    outputs = {o.name for o in model.graph.output}
    return sum(1 for n in model.graph.node if n.op_type == "Cast"
               and types.get(n.input[0]) == helper.get_node_attr_value(n, "to")
               and (n.output[0] in outputs or not graph_outputs_only))


def _const_shape(layout, channels: int) -> tuple[int, ...]:
    """A constant shape from a layout such as (1, "C", 1, 1): "C" is the channel count."""
    return tuple(channels if d == "C" else d for d in layout)


def conv_chain(ops, layout, *, casts: bool = False, bias: bool = True, source: str = "initializer",
               c_in: int = 4, c_out: int = 6, dtype: str = "fp32", opset: int = 17,
               ir_version: int | None = None, seed: int = 0) -> onnx.ModelProto:
    """x[batch, c_in, 9, 7] -> Conv(pads 1) -> affine chain (constants `layout`) -> y."""
    b = GraphBuilder(dtype, opset=opset, ir_version=ir_version, seed=seed)
    x = b.input("x", ["batch", c_in, *SPATIAL[2]])
    inputs = [x, b.weight("conv_W", [c_out, c_in, 3, 3])]
    if bias:
        inputs.append(b.weight("conv_B", [c_out], fan_in=1))
    y = b.node("Conv", inputs, name="conv", **_conv_attrs(2, 3, 1))
    affine_chain(b, y, ops, _const_shape(layout, c_out), out="y", casts=casts, source=source)
    b.output("y")
    return b.build()


def gemm_chain(ops, layout, *, casts: bool = False, trans_b: int = 0, beta: float = 1.0,
               c: str | None = "n", k: int = 4, n: int = 6, seed: int = 0) -> onnx.ModelProto:
    """a[batch, k] -> Gemm(B, C) -> affine chain -> y."""
    b = GraphBuilder(seed=seed)
    a = b.input("a", ["batch", k])
    w = b.weight("gemm_B", [n, k] if trans_b else [k, n], fan_in=k)
    y = b.node("Gemm", [a, w] + _gemm_c(b, c, "batch", n), name="gemm",
               **_gemm_attrs(0, trans_b, 1.0, beta))
    affine_chain(b, y, ops, _const_shape(layout, n), out="y", casts=casts)
    b.output("y")
    return b.build()


def matmul_chain(ops, layout, *, rank: int = 2, bias: str | None = "right", casts: bool = False,
                 t: int = 7, k: int = 4, n: int = 6, seed: int = 0) -> onnx.ModelProto:
    """x[batch, k] or x[batch, t, k] -> MatMul(W[k, n]) [-> Add(bias[n])] -> chain -> y: the
    Dense export; the feature axis is the last one, whatever the rank. In `layout`, "C" is n
    and "T" is t."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["batch", k] if rank == 2 else ["batch", t, k])
    y = b.node("MatMul", [x, b.weight("mm_W", [k, n], fan_in=k)], name="matmul")
    y = _add_bias(b, y, n, bias)
    shape = tuple(t if d == "T" else d for d in _const_shape(layout, n))
    affine_chain(b, y, ops, shape, out="y", casts=casts)
    b.output("y")
    return b.build()


def act_chain_linear(ops, layout, *, kind: str = "matmul_add", act: str = "Relu",
                     casts: bool = False, rank: int = 2, t: int = 7, k: int = 4, n: int = 6,
                     seed: int = 0) -> onnx.ModelProto:
    """x[batch, (t,) k] -> act -> affine chain (on k) -> Dense -> y: folds forward only.

    `kind`: "gemm" (transB=1, rank 2 only), "matmul" or "matmul_add". In `layout`, "C" is k
    and "T" is t."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["batch", k] if rank == 2 else ["batch", t, k])
    shape = tuple(t if d == "T" else d for d in _const_shape(layout, k))
    x = affine_chain(b, b.node(act, [x], name="act"), ops, shape, casts=casts)
    if kind == "gemm":
        b.node("Gemm", [x, b.weight("gemm_B", [n, k], fan_in=k), b.weight("gemm_C", [n], fan_in=1)],
               name="gemm", outputs=["y"], transB=1)
    else:
        y = b.node("MatMul", [x, b.weight("mm_W", [k, n], fan_in=k)], name="matmul")
        y = _add_bias(b, y, n, "right" if kind == "matmul_add" else None)
        b.node("Identity", [y], name="out", outputs=["y"])
    b.output("y")
    return b.build()


def keras_conv_chain(ops=CHAIN_FORMS["sub_mul_add"], *, bias: bool = True, casts: bool = True,
                     layout=(1, 1, 1, "C"), c_in: int = 4, c_out: int = 6,
                     seed: int = 0) -> onnx.ModelProto:
    """Keras Conv2D + BatchNormalization as exported, channels last:
    x[batch, 9, 7, c_in] -> Transpose(NHWC->NCHW) -> Conv -> Transpose(NCHW->NHWC)
    [-> Add(bias [1, 1, 1, C])] -> chain(constants `layout`) -> y, with no-op Casts between."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["batch", *SPATIAL[2], c_in])
    x = b.node("Transpose", [x], name="to_nchw", perm=[0, 3, 1, 2])
    y = b.node("Conv", [x, b.weight("conv_W", [c_out, c_in, 3, 3])], name="conv",
               **_conv_attrs(2, 3, 1))
    y = b.node("Transpose", [y], name="to_nhwc", perm=[0, 2, 3, 1])
    if casts:
        y = noop_cast(b, y, "cast_conv")
    if bias:
        y = b.node("Add", [y, b.weight("conv_bias", [1, 1, 1, c_out], fan_in=1)], name="bias_add")
    affine_chain(b, y, ops, _const_shape(layout, c_out), out="y", casts=casts)
    b.output("y")
    return b.build()


def act_chain_conv(ops, layout, *, pads: int = 0, c_in: int = 4, c_out: int = 6,
                   seed: int = 0) -> onnx.ModelProto:
    """x[batch, c_in, 9, 7] -> Relu -> affine chain (on c_in) -> Conv(3x3, pads) -> y."""
    b = GraphBuilder(seed=seed)
    x = b.node("Relu", [b.input("x", ["batch", c_in, *SPATIAL[2]])], name="act")
    x = affine_chain(b, x, ops, _const_shape(layout, c_in))
    b.node("Conv", [x, b.weight("conv_W", [c_out, c_in, 3, 3]), b.weight("conv_B", [c_out], fan_in=1)],
           name="conv", outputs=["y"], **_conv_attrs(2, 3, pads))
    b.output("y")
    return b.build()


def conv_relu_chain_flatten_gemm(ops, layout, *, via: str = "Flatten", c: int = 4, n: int = 10,
                                 seed: int = 0) -> onnx.ModelProto:
    """x -> Conv(pads 0) -> Relu -> affine chain (on c) -> Flatten | Reshape([0, -1]) -> Gemm -> y."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["batch", 2, 8, 9])
    y = b.node("Conv", [x, b.weight("conv_W", [c, 2, 3, 3]), b.weight("conv_B", [c], fan_in=1)],
               name="conv", kernel_shape=[3, 3])
    y = affine_chain(b, b.node("Relu", [y], name="relu"), ops, _const_shape(layout, c))
    if via == "Flatten":
        y = b.node("Flatten", [y], name="flatten", axis=1)
    else:
        y = b.node("Reshape", [y, b.const("flat_shape", np.array([0, -1], dtype=np.int64))],
                   name="reshape")
    features = c * 6 * 7
    b.node("Gemm", [y, b.weight("gemm_B", [n, features], fan_in=features),
                    b.weight("gemm_C", [n], fan_in=1)], name="gemm", outputs=["y"], transB=1)
    b.output("y")
    return b.build()
