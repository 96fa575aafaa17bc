"""Deep torch architectures for the check's tests and benchmark, written here (torchvision's wheel
does not import with this torch): a bottleneck ResNet-50 and an EfficientNet-B0-like net.

Weights are torch's seeded default initialisation; each batch norm's running statistics are
measured on random batches in training mode and then perturbed, as after real training.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(c_out))

    def forward(self, x):
        return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))


def resnet50(base: int = 64, classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-50 layout: stem, [3, 4, 6, 3] bottlenecks, 53 batch norms."""
    layers = [nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    c = base
    for i, blocks in enumerate((3, 4, 6, 3)):
        width = base * 2**i
        for b in range(blocks):
            layers.append(Bottleneck(c, width, 2 if b == 0 and i > 0 else 1))
            c = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeezed: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, squeezed, 1), nn.Conv2d(squeezed, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(nn.functional.silu(self.reduce(s))))


class MBConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, expand: int, k: int, stride: int):
        super().__init__()
        mid = c_in * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU()]
        layers += [nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False),
                   nn.BatchNorm2d(mid), nn.SiLU(), SqueezeExcite(mid, max(1, c_in // 4)),
                   nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


def efficientnet_b0(scale: float = 1.0, classes: int = 1000) -> nn.Module:
    """EfficientNet-B0's stages (expand, kernel, stride, channels, repeats), channels scaled."""
    ch = lambda c: max(8, int(c * scale) // 8 * 8)
    stages = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
              (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
    layers = [nn.Conv2d(3, ch(32), 3, 2, 1, bias=False), nn.BatchNorm2d(ch(32)), nn.SiLU()]
    c = ch(32)
    for expand, k, stride, c_out, repeats in stages:
        for r in range(repeats):
            layers.append(MBConv(c, ch(c_out), expand, k, stride if r == 0 else 1))
            c = ch(c_out)
    layers += [nn.Conv2d(c, ch(1280), 1, bias=False), nn.BatchNorm2d(ch(1280)), nn.SiLU(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch(1280), classes)]
    return nn.Sequential(*layers)


def with_statistics(module: nn.Module, image: int, seed: int, batches: int = 2) -> nn.Module:
    """Running statistics measured on random batches in training mode, then perturbed (means
    moved by a fraction of their spread, variances scaled by 0.5..2), gamma and beta random."""
    torch.manual_seed(seed)
    for m in module.modules():  # fresh default init, seeded
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average of the batches
            m.reset_running_stats()
    module.train()
    with torch.no_grad():
        for _ in range(batches):
            module(torch.randn(4, 3, image, image))
        g = torch.Generator().manual_seed(seed + 1)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean += 0.2 * m.running_var.sqrt() * torch.randn(n, generator=g)
                m.running_var *= 2.0 ** (2 * torch.rand(n, generator=g) - 1)
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
    return module.eval()


# Exporter settings. The defaults of both exporters already fuse Conv+BN (TorchScript while
# constant folding; dynamo's optimizer fuses Gemm+BN too), so the "raw" settings, which keep every
# BatchNormalization node, are what really exercises the folding; the defaults are what users get.
EXPORTERS = {
    "torchscript": dict(dynamo=False, do_constant_folding=False),
    "torchscript_default": dict(dynamo=False),
    "dynamo": dict(dynamo=True, optimize=False),
    "dynamo_default": dict(dynamo=True),
}
RAW_EXPORTERS = ("torchscript", "dynamo")


def export(module: nn.Module, sample: np.ndarray, path: Path, exporter: str, *,
           opset: int | None = None, training: bool = False) -> onnx.ModelProto:
    """``module`` traced on ``sample`` and exported with a symbolic batch axis to ``path``."""
    options = dict(EXPORTERS[exporter], input_names=["x"], output_names=["y"])
    if opset is not None:
        options["opset_version"] = opset
    if options["dynamo"]:
        options |= dict(external_data=False, verbose=False,
                        dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        options["dynamic_axes"] = {"x": {0: "batch"}, "y": {0: "batch"}}
    if training:
        options["training"] = torch.onnx.TrainingMode.TRAINING
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.from_numpy(sample),), str(path), **options)
    return onnx.load(path)


def torch_eval(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()
