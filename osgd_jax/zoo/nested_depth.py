"""The depth-nested (interlaced) family: each stage doubles the depth.

:class:`NestedDepthNet` is the network and :class:`InterlacedStage` one of
its stages. The width+depth family
(:class:`~osgd_jax.zoo.nested_width_depth.NestedWidthDepthNet`) is the same
construction with chains that widen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
from flax import nnx

from osgd_jax.zoo.base import AnytimeNet, check_config, check_size
from osgd_jax.zoo.blocks import Backbone
from osgd_jax.zoo.transformer import share_head

__all__ = ["InterlacedStage", "NestedDepthNet"]


class InterlacedStage(nnx.Module):
  """One stage of an interlaced network: a chain of new layers and a head.

  Args:
    backbone: conv or dense backbone.
    stem_width: width of the stem output, where the chain starts.
    chain_width: width of this stage's layers (before level scaling).
    levels: resolution level of each new layer (that of its lateral input).
    lateral_features: widths of the cached outputs ``o_1 .. o_n`` the new
      layers read; ``None`` for stage 1, which owns the stem and has no
      lateral inputs.
    num_classes: classes of the exit head.
    norm: normalisation, see :func:`~osgd_jax.zoo.blocks.make_norm`.
    rngs: the random generators.
  """

  def __init__(
    self,
    backbone: Backbone,
    *,
    stem_width: int,
    chain_width: int,
    levels: Sequence[int],
    lateral_features: Sequence[int] | None,
    num_classes: int,
    norm: str,
    rngs: nnx.Rngs,
  ):
    first = lateral_features is None
    self.stem = (
      backbone.stem(stem_width, norm=norm, rngs=rngs) if first else None
    )
    self.depth = len(levels)
    layers, outs, prev_f, prev_l = [], [], stem_width, 0
    for i, level in enumerate(levels):
      out = backbone.scale(chain_width, level)
      stride = 2 ** (level - prev_l)
      if first:
        ins, strides = (prev_f,), (stride,)
      else:
        ins, strides = (prev_f, lateral_features[i]), (stride, 1)
      layers.append(
        backbone.layer(ins, out, strides=strides, norm=norm, rngs=rngs)
      )
      outs.append(out)
      prev_f, prev_l = out, level
    self.layers = nnx.List(layers)
    self.out_features = tuple(outs)
    self.head = backbone.head(prev_f, num_classes, rngs=rngs)

  def __call__(self, carry: Any) -> tuple[dict[str, Any], jax.Array]:
    if self.stem is not None:
      h0, lateral = self.stem(carry), None
    else:
      h0, lateral = carry["stem"], carry["outputs"]
    h, new = h0, []
    for i, layer in enumerate(self.layers):
      h = layer([h] if lateral is None else [h, lateral[i]])
      new.append(h)
    if lateral is None:
      outputs = tuple(new)
    else:
      outputs = tuple(
        o for pair in zip(lateral, new, strict=True) for o in pair
      )
    return {"stem": h0, "outputs": outputs}, self.head(h)


class NestedDepthNet(AnytimeNet):
  """Depth-nested (interlaced) network: each stage doubles the depth.

  Stage 1 is a plain chain: a stem and ``D`` residual layers ``S_1 = (L_1
  .. L_D)``. After stage k the layer sequence ``S_k = (L_1 .. L_n)`` has
  ``n = D * 2**(k-1)`` layers with cached outputs ``o_1 .. o_n``. Stage k+1
  adds a new chain ``N_1 .. N_n``: ``N_i`` reads the previous new layer's
  output (the stem output for ``N_1``) together with ``o_i``, the output of
  the old layer at the same position (its lateral input). In sequence order
  ``N_i`` sits right after ``L_i``, so ``S_{k+1} = (L_1, N_1, L_2, N_2, ..
  L_n, N_n)`` has twice the layers. Exit k+1 reads the end of the new
  chain::

      stage 1:   stem ─> L1 ────────> L2 ──────> head 1
                  │       │            │
                  │       o1           o2          (lateral inputs)
                  │       ▼            ▼
      stage 2:    └────> N1 ────────> N2 ──────> head 2
      S_2 = (L1, N1, L2, N2); stage 3 adds one layer after each of them:
      stage 3:   stem ─> M1 ─> M2 ─> M3 ─> M4 ─> head 3   (M_i reads S_2[i])

  Old layers never read new ones, so nothing computed for exits <= k is
  recomputed or changed: exit k depends only on stages 1..k. With the conv
  backbone, ``S_1``'s layers 2 .. downsamples+1 halve the resolution (and
  double the width). A new layer works at its lateral input's resolution,
  with its stage's width doubled per halving, and strides its chain input
  where the lateral is coarser.

  ``stages[k-1]`` owns stage k's layers and head k (stage 1 also the stem).

  Carry: stage 1 takes the input batch. Stage k returns
  ``{"stem": h_0, "outputs": (o_1, ..., o_n)}``: the stem output and the
  outputs of all ``n = D * 2**(k-1)`` layers of ``S_k`` in sequence order.

  Args:
    backbone: what a layer is: :func:`~osgd_jax.zoo.blocks.conv_backbone`
      for NHWC images (a ResNet), :func:`~osgd_jax.zoo.blocks.dense_backbone`
      for feature vectors (an MLP).
    stages: number of stages and exits K.
    width: width of every stage's layers (conv: doubles per halving).
    depth: number of layers ``D`` of stage 1; exit k has ``D * 2**(k-1)``.
    num_classes: classes of every exit.
    norm: ``batch``, ``group``, ``layer`` or ``none``.
    rngs: the random generators.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from osgd_jax import zoo
    >>> resnet = zoo.NestedDepthNet(
    ...     zoo.conv_backbone(in_channels=3, downsamples=2), stages=3,
    ...     width=4, depth=1, rngs=nnx.Rngs(0))
    >>> resnet(jnp.ones((2, 32, 32, 3))).shape, resnet.depth_per_exit()
    ((3, 2, 10), (1, 2, 4))
    >>> mlp = zoo.NestedDepthNet(zoo.dense_backbone(in_features=64),
    ...                          stages=3, width=8, depth=1, rngs=nnx.Rngs(0))
    >>> mlp(jnp.ones((2, 64)), upto=2).shape
    (2, 2, 10)
  """

  # Each stage's chain is this many times wider than the previous stage's:
  # the width+depth family is this construction with 2.
  chain_growth: ClassVar[int] = 1

  def __init__(
    self,
    backbone: Backbone,
    *,
    stages: int,
    width: int,
    depth: int,
    num_classes: int = 10,
    norm: str = "batch",
    rngs: nnx.Rngs,
  ):
    check_config(
      backbone,
      stages=stages,
      width=width,
      depth=depth,
      num_classes=num_classes,
      norm=norm,
    )
    # Stages 1 and 2 have ``depth`` layers; every later one doubles the count.
    check_size(
      type(self).__name__,
      stages,
      lambda s: (
        depth * 2 ** (s - 1),
        backbone.scale(
          width * self.chain_growth ** (s - 1), backbone.downsamples
        ),
      ),
    )
    self.backbone = backbone
    self.num_classes = num_classes
    built, sequence = [], []  # sequence: (features, level) of S_k, in order
    for k in range(stages):
      first = k == 0
      levels = (
        backbone.levels(depth) if first else [level for _, level in sequence]
      )
      stage = InterlacedStage(
        backbone,
        stem_width=width,
        chain_width=width * self.chain_growth**k,
        levels=levels,
        lateral_features=None if first else [f for f, _ in sequence],
        num_classes=num_classes,
        norm=norm,
        rngs=rngs,
      )
      new = list(zip(stage.out_features, levels, strict=True))
      sequence = (
        new
        if first
        else [s for p in zip(sequence, new, strict=True) for s in p]
      )
      built.append(stage)
    if getattr(backbone, "shared_head", False):
      built = share_head(
        built,
        backbone,  # pyright: ignore[reportArgumentType]
        num_classes,
        family=type(self).__name__,
        rngs=rngs,
      )
    self.stages = nnx.List(built)
