"""PyTorch twins of osgd_jax's networks, for the step benchmarks only.

``bench_step.py`` compares our JAX training step with PyTorch and TorchJD on
the *same* architecture, so these modules rebuild the zoo's wiring layer for
layer (see ``osgd_jax/zoo/blocks.py``, ``branched.py`` and
``nested_depth.py``): the same widths, depths, strides, norms, skip paths and
exit heads, in the same order, hence the same parameter count, which the
benchmark prints side by side with ours.

Two differences are deliberate and cost-neutral:

* layout: PyTorch convolutions take NCHW, so the images are NCHW here (the
  zoo is NHWC); the benchmark feeds each framework its native layout;
* padding: ``nnx.Conv(padding="SAME")`` pads a stride-2 3×3 convolution by
  (0, 1), PyTorch's ``padding=1`` by (1, 1). The output shapes, and so the
  FLOPs, are equal; only which border pixel is dropped differs.

Only the ``batch`` norm is built: it is what the presets use.

``ExitMLP`` is the twin of ``bench_memory.py``'s parameter-dominated MLP
(not a zoo model), with which ``bench_memory.py`` times TorchJD's autogram.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["build", "ExitMLP", "TorchAnytimeNet"]


class _Backbone:
  """What a layer is: a 3×3 convolution on NCHW images, or a dense layer."""

  def __init__(self, kind: str, in_features: int, downsamples: int = 0):
    self.kind = kind
    self.in_features = in_features
    self.downsamples = downsamples

  def linear(
    self, fan_in: int, fan_out: int, *, stride: int = 1, kernel: int = 3
  ) -> nn.Module:
    # No bias: every linear map of the zoo's blocks is followed by a
    # BatchNorm (or is a skip added before one), as with norm="batch".
    if self.kind == "conv":
      return nn.Conv2d(
        fan_in, fan_out, kernel, stride=stride, padding=kernel // 2, bias=False
      )
    return nn.Linear(fan_in, fan_out, bias=False)

  def norm(self, features: int) -> nn.Module:
    # nnx.BatchNorm(momentum=0.9) keeps 0.9 of the old statistics; PyTorch's
    # momentum is the weight of the new batch.
    cls = nn.BatchNorm2d if self.kind == "conv" else nn.BatchNorm1d
    return cls(features, eps=1e-5, momentum=0.1)

  def levels(self, depth: int) -> list[int]:
    return [min(i, self.downsamples) for i in range(depth)]

  def pool(self, h: torch.Tensor) -> torch.Tensor:
    return h.mean(dim=(2, 3)) if self.kind == "conv" else h


class _Stem(nn.Module):
  def __init__(self, backbone: _Backbone, width: int):
    super().__init__()
    self.linear = backbone.linear(backbone.in_features, width)
    self.norm = backbone.norm(width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.relu(self.norm(self.linear(x)))


class _ResidualLayer(nn.Module):
  """The zoo's residual block: several inputs summed, then the basic block."""

  def __init__(
    self,
    backbone: _Backbone,
    in_features: Sequence[int],
    out_features: int,
    strides: Sequence[int],
  ):
    super().__init__()
    self.inputs = nn.ModuleList(
      [
        backbone.linear(f, out_features, stride=s)
        for f, s in zip(in_features, strides, strict=True)
      ]
    )
    self.norm1 = backbone.norm(out_features)
    self.linear = backbone.linear(out_features, out_features)
    self.norm2 = backbone.norm(out_features)
    # Dense layers ignore strides, as in the zoo's dense backbone.
    strided = strides[0] != 1 and backbone.kind == "conv"
    if in_features[0] == out_features and not strided:
      self.skip = None
    else:
      self.skip = backbone.linear(
        in_features[0], out_features, stride=strides[0], kernel=1
      )

  def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    h = sum(lin(x) for lin, x in zip(self.inputs, inputs, strict=True))
    h = self.norm2(self.linear(F.relu(self.norm1(h))))
    skip = inputs[0] if self.skip is None else self.skip(inputs[0])
    return F.relu(h + skip)


class _Head(nn.Module):
  def __init__(self, backbone: _Backbone, features: int, num_classes: int):
    super().__init__()
    self.pool = backbone.pool
    self.linear = nn.Linear(features, num_classes)

  def forward(self, h: torch.Tensor) -> torch.Tensor:
    return self.linear(self.pool(h))


class _BranchedStage(nn.Module):
  def __init__(
    self,
    backbone: _Backbone,
    in_features: int | None,
    width: int,
    depth: int,
    stride: int,
    num_classes: int,
  ):
    super().__init__()
    self.stem = _Stem(backbone, width) if in_features is None else None
    fan_in = width if in_features is None else in_features
    self.layers = nn.ModuleList(
      [
        _ResidualLayer(
          backbone,
          (fan_in if i == 0 else width,),
          width,
          (stride if i == 0 else 1,),
        )
        for i in range(depth)
      ]
    )
    self.head = _Head(backbone, width, num_classes)

  def forward(self, carry):
    h = carry if self.stem is None else self.stem(carry)
    for layer in self.layers:
      h = layer([h])
    return h, self.head(h)


class _InterlacedStage(nn.Module):
  """A new chain whose layer i reads the chain and the old layer i's output."""

  def __init__(
    self,
    backbone: _Backbone,
    stem_width: int,
    chain_width: int,
    levels: Sequence[int],
    lateral: Sequence[int] | None,
    num_classes: int,
  ):
    super().__init__()
    self.stem = _Stem(backbone, stem_width) if lateral is None else None
    layers, outs, prev_f, prev_l = [], [], stem_width, 0
    for i, level in enumerate(levels):
      out = chain_width * 2**level
      stride = 2 ** (level - prev_l)
      ins, strides = (
        ((prev_f,), (stride,))
        if lateral is None
        else ((prev_f, lateral[i]), (stride, 1))
      )
      layers.append(_ResidualLayer(backbone, ins, out, strides))
      outs.append(out)
      prev_f, prev_l = out, level
    self.layers = nn.ModuleList(layers)
    self.out_features = tuple(outs)
    self.head = _Head(backbone, prev_f, num_classes)

  def forward(self, carry):
    if self.stem is not None:
      h0, lateral = self.stem(carry), None
    else:
      h0, lateral = carry
    h, new = h0, []
    for i, layer in enumerate(self.layers):
      h = layer([h] if lateral is None else [h, lateral[i]])
      new.append(h)
    outputs = (
      new
      if lateral is None
      else [o for pair in zip(lateral, new, strict=True) for o in pair]
    )
    return (h0, outputs), self.head(h)


class TorchAnytimeNet(nn.Module):
  """K stages run in order; ``forward`` returns the list of K exit logits."""

  def __init__(self, stages: Sequence[nn.Module]):
    super().__init__()
    self.stages = nn.ModuleList(stages)

  def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
    carry, logits = x, []
    for stage in self.stages:
      carry, out = stage(carry)
      logits.append(out)
    return logits


def _branched(
  backbone: _Backbone, stages: int, width: int, depth: int, num_classes: int
) -> TorchAnytimeNet:
  built, fan_in, level = [], None, 0
  for k in range(stages):
    new_level = min(k, backbone.downsamples)
    stage_width = width * 2**new_level
    built.append(
      _BranchedStage(
        backbone,
        fan_in,
        stage_width,
        depth,
        2 ** (new_level - level),
        num_classes,
      )
    )
    fan_in, level = stage_width, new_level
  return TorchAnytimeNet(built)


def _interlaced(
  backbone: _Backbone, stages: int, width: int, depth: int, num_classes: int
) -> TorchAnytimeNet:
  built, sequence = [], []  # (features, level) of the layer sequence S_k
  for k in range(stages):
    first = k == 0
    levels = (
      backbone.levels(depth) if first else [level for _, level in sequence]
    )
    stage = _InterlacedStage(
      backbone,
      width,
      width,
      levels,
      None if first else [f for f, _ in sequence],
      num_classes,
    )
    new = list(zip(stage.out_features, levels, strict=True))
    sequence = (
      new if first else [s for p in zip(sequence, new, strict=True) for s in p]
    )
    built.append(stage)
  return TorchAnytimeNet(built)


def build(name: str, config: dict) -> TorchAnytimeNet:
  """The twin of ``zoo.create(name, **config)`` for the supported names.

  Args:
    name: ``branched-resnet``, ``nested-depth-resnet``, ``branched-mlp`` or
      ``nested-depth-mlp``.
    config: the zoo constructor config (a preset, with the input size).

  Returns:
    The PyTorch module, in train mode.
  """
  if config.get("norm", "batch") != "batch":
    raise ValueError("the PyTorch twins build norm='batch' only.")
  family, kind = name.rsplit("-", 1)
  if kind == "resnet":
    backbone = _Backbone("conv", config["in_channels"], config["downsamples"])
  elif kind == "mlp":
    backbone = _Backbone("dense", config["in_features"])
  else:
    raise ValueError(f"no PyTorch twin for {name!r}.")
  builders = {"branched": _branched, "nested-depth": _interlaced}
  if family not in builders:
    raise ValueError(f"no PyTorch twin for {name!r}.")
  return builders[family](
    backbone,
    config["stages"],
    config["width"],
    config["depth"],
    config["num_classes"],
  )


class ExitMLP(nn.Module):
  """The twin of ``bench_memory.ExitMLP``: a dense trunk with K exit heads.

  The same layers in the same order as the JAX module: ``layers`` dense
  layers (with biases) of ``width`` units after ReLU, and K linear heads,
  exit k reading hidden layer ``ceil((k + 1) L / K) - 1``. No normalization:
  TorchJD's autogram engine hooks every ``nn.Linear`` as it is.
  """

  def __init__(
    self,
    in_features: int,
    width: int,
    layers: int,
    num_exits: int,
    num_classes: int,
  ):
    super().__init__()
    sizes = [in_features] + [width] * layers
    self.layers = nn.ModuleList(
      [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    )
    self.heads = nn.ModuleList(
      [nn.Linear(width, num_classes) for _ in range(num_exits)]
    )
    self.reads = [
      math.ceil((k + 1) * layers / num_exits) - 1 for k in range(num_exits)
    ]

  def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
    hidden = []
    for layer in self.layers:
      x = F.relu(layer(x))
      hidden.append(x)
    return [
      head(hidden[i]) for head, i in zip(self.heads, self.reads, strict=True)
    ]
