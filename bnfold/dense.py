"""Find the layers `bnfold insert` can put a BatchNormalization after.

A Dense layer is a Gemm, or a MatMul by a constant 2-D weight with the bias Add that follows it, as
torch and Keras export `Linear`/`Dense` (Keras puts no-op Casts around both); Conv and ConvTranspose
count when asked for. Each layer is reported with its feature counts (from the weight's shape), the
activation that directly follows it and any BatchNormalization already after it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx

from bnfold.errors import BadInput
from bnfold.graph import GraphView, NameAllocator, infer_shapes
from bnfold.nodes import attr, display_name

DENSE_OPS = ("Gemm", "MatMul")
CONV_OPS = ("Conv", "ConvTranspose")
LAYER_OPS = DENSE_OPS + CONV_OPS

# Element-wise activations a layer's BN may follow (Keras: Dense(n, activation=...)).
ACTIVATIONS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Gelu", "HardSigmoid",
    "HardSwish", "Softplus", "Clip",
})


@dataclass
class Layer:
    """One Dense (or convolution) layer of the main graph."""

    name: str  # node name; the weight (or output) tensor name when the node is unnamed
    op: str
    node: onnx.NodeProto
    output: str  # the layer's output: after the bias Add of a MatMul
    in_features: int | None
    out_features: int | None
    rank: int | None  # rank of `output`, None when shape inference cannot tell
    dtype: int | None  # element type of `output` (that of the weight)
    channel_last: bool  # features on the last axis (Gemm, MatMul) rather than axis 1 (Conv)
    bias: str | None = None  # the bias Add node's display name (MatMul layers)
    activation: onnx.NodeProto | None = None
    batchnorm: str | None = None  # a BatchNormalization already after the layer or activation
    batchnorm_before: str | None = None  # a BatchNormalization producing the layer's input

    @property
    def activation_op(self) -> str | None:
        return self.activation.op_type if self.activation is not None else None

    def to_dict(self) -> dict:
        return {
            "name": self.name, "op": self.op, "node": self.node.name, "output": self.output,
            "in_features": self.in_features, "out_features": self.out_features,
            "rank": self.rank, "bias": self.bias,
            "activation": self.activation_op,
            "activation_node": display_name(self.activation) if self.activation else None,
            "batchnorm": self.batchnorm, "batchnorm_before": self.batchnorm_before,
        }


def find_layers(model: onnx.ModelProto, ops=DENSE_OPS) -> list[Layer]:
    """The layers of the main graph whose op is in `ops`, in node order."""
    unknown = sorted(set(ops) - set(LAYER_OPS))
    if unknown:
        raise BadInput(f"unknown layer op {', '.join(unknown)}: choose from {', '.join(LAYER_OPS)}")
    shapes, types = infer_shapes(model)
    view = GraphView(model, model.graph, outer=None, base_dir=None,
                     allow_initializer_inputs=True, shapes=shapes, types=types,
                     names=NameAllocator(model))
    layers = [layer for node in model.graph.node
              if node.op_type in ops and node.domain in ("", "ai.onnx")
              for layer in [_match(view, node)] if layer is not None]
    _make_names_unique(layers)
    return layers


# -- matching -------------------------------------------------------------------------------

def _match(view: GraphView, node: onnx.NodeProto) -> Layer | None:
    if node.op_type == "MatMul":
        return _match_matmul(view, node)
    if len(node.input) < 2 or not node.output:
        return None
    weight, out = node.input[1], node.output[0]
    shape = view.shape(weight)
    source = _constant_source(view, weight)
    dtype = view.constant_dtype(source) if source else view.types.get(out)
    layer = Layer(name=node.name or weight, op=node.op_type, node=node, output=out,
                  in_features=None, out_features=None, rank=view.rank(out), dtype=dtype,
                  channel_last=node.op_type == "Gemm")
    if node.op_type == "Gemm":
        layer.rank = 2
        if shape is not None and len(shape) == 2:
            k, n = (shape[1], shape[0]) if attr(node, "transB", 0) else shape
            layer.in_features, layer.out_features = _int(k), _int(n)
    elif shape is not None and len(shape) >= 3:
        group = attr(node, "group", 1)
        if node.op_type == "Conv":  # weight [M, C/group, k...]
            layer.in_features, layer.out_features = _mul(shape[1], group), _int(shape[0])
        else:  # ConvTranspose weight [C, M/group, k...]
            layer.in_features, layer.out_features = _int(shape[0]), _mul(shape[1], group)
        layer.rank = len(shape)
    _follow(view, layer)
    return layer


def _match_matmul(view: GraphView, node: onnx.NodeProto) -> Layer | None:
    """MatMul(X, W) with W a constant [K, N] (through no-op Casts), then its optional bias Add."""
    if len(node.input) != 2:
        return None
    weight = _constant_source(view, node.input[1])
    shape = view.shape(weight) if weight else None
    if shape is None or len(shape) != 2:
        return None
    dtype = view.constant_dtype(weight)
    out = node.output[0]
    layer = Layer(name=node.name or node.input[1], op="MatMul", node=node, output=out,
                  in_features=_int(shape[0]), out_features=_int(shape[1]), rank=None,
                  dtype=dtype, channel_last=True)
    end = _forward_noop_casts(view, out, dtype)
    add = view.sole_user(end)
    if add is not None and add.op_type == "Add" and _is_bias(view, add, end, layer.out_features):
        layer.output, layer.bias = add.output[0], display_name(add)
    x_rank = view.rank(node.input[0])
    layer.rank = view.rank(layer.output) or view.rank(out) or (
        max(x_rank, 2) if x_rank is not None and x_rank >= 2 else x_rank)
    _follow(view, layer)
    return layer


def _is_bias(view: GraphView, add: onnx.NodeProto, x: str, features: int | None) -> bool:
    """`add` adds to `x` a constant that varies along the features only: [N], [1, N], [1, 1, N]."""
    others = [name for name in add.input if name != x]
    if len(add.input) != 2 or len(others) != 1:
        return False
    source = _constant_source(view, others[0])
    shape = view.shape(source) if source else None
    return (shape is not None and len(shape) >= 1 and shape[-1] in (features, 1)
            and all(d == 1 for d in shape[:-1]))


def _follow(view: GraphView, layer: Layer) -> None:
    """Record the activation directly after the layer, any BN already after either, and a BN
    right before the layer."""
    source = view.producer.get(layer.node.input[0])
    while _is_noop_cast(source, layer.dtype):
        source = view.producer.get(source.input[0])
    if source is not None and source.op_type == "BatchNormalization":
        layer.batchnorm_before = display_name(source)
    end = _forward_noop_casts(view, layer.output, layer.dtype)
    user = view.sole_user(end)
    if user is not None and user.op_type in ACTIVATIONS and user.input[0] == end:
        layer.activation = user
    watched = [layer.output, end]
    if layer.activation is not None:
        act_out = layer.activation.output[0]
        watched += [act_out, _forward_noop_casts(view, act_out, layer.dtype)]
    for name in dict.fromkeys(watched):
        for user in view.users(name):
            if user.op_type == "BatchNormalization" and user.input[0] == name:
                layer.batchnorm = display_name(user)
                return


# -- no-op Casts ----------------------------------------------------------------------------

def _is_noop_cast(node: onnx.NodeProto | None, dtype: int | None) -> bool:
    return (node is not None and node.op_type == "Cast" and dtype is not None
            and attr(node, "to") == dtype)


def _forward_noop_casts(view: GraphView, name: str, dtype: int | None) -> str:
    """Follow a chain of single-consumer no-op Casts (Keras exports) from `name`."""
    user = view.sole_user(name)
    while _is_noop_cast(user, dtype):
        name = user.output[0]
        user = view.sole_user(name)
    return name


def _constant_source(view: GraphView, name: str) -> str | None:
    """The initializer or Constant that `name` is, possibly through no-op Casts; else None."""
    casts = []
    producer = view.producer.get(name)
    while producer is not None and producer.op_type == "Cast":
        casts.append(producer)
        name = producer.input[0]
        producer = view.producer.get(name)
    if name not in view.scope.initializers and name not in view.scope.constant_nodes:
        return None
    dtype = view.constant_dtype(name)
    return name if all(_is_noop_cast(cast, dtype) for cast in casts) else None


# -- names ----------------------------------------------------------------------------------

def _make_names_unique(layers: list[Layer]) -> None:
    """Unnamed nodes sharing a weight get their output's name, which is unique."""
    counts = Counter(layer.name for layer in layers)
    for layer in layers:
        if counts[layer.name] > 1:
            layer.name = layer.node.output[0]


def _int(dim) -> int | None:
    return dim if isinstance(dim, int) else None


def _mul(dim, group: int) -> int | None:
    return dim * group if isinstance(dim, int) else None
