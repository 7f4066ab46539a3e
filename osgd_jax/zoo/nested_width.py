"""The width-nested family: each stage adds a channel group to every layer.

:class:`NestedWidthNet` is the network; :class:`WidthStage` one of its
stages, and :func:`group_widths` the widths of the groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from osgd_jax.zoo.base import AnytimeNet, check_config, check_size
from osgd_jax.zoo.blocks import Backbone, group_widths
from osgd_jax.zoo.transformer import MatFormerStage

__all__ = ["group_widths", "WidthStage", "NestedWidthNet"]


class WidthStage(nnx.Module):
  """Stage k of a width-nested network: group k of every layer, and head k.

  Args:
    backbone: conv or dense backbone.
    widths: the group widths of all stages (see :func:`group_widths`).
    index: this stage's 0-based index, k-1.
    depth: number of residual layers.
    num_classes: classes of the exit head.
    norm: normalisation, see :func:`~osgd_jax.zoo.blocks.make_norm`.
    rngs: the random generators.
  """

  def __init__(
    self,
    backbone: Backbone,
    *,
    widths: Sequence[int],
    index: int,
    depth: int,
    num_classes: int,
    norm: str,
    rngs: nnx.Rngs,
  ):
    own, old = widths[index], sum(widths[:index])
    self.first = index == 0
    # Later stages widen existing layer positions; they add no depth.
    self.depth = depth if self.first else 0
    self.stem = backbone.stem(own, norm=norm, rngs=rngs)
    layers, prev = [], 0
    for level in backbone.levels(depth):
      ins = (own, old) if old else (own,)
      layers.append(
        backbone.layer(
          tuple(backbone.scale(f, prev) for f in ins),
          backbone.scale(own, level),
          strides=(2 ** (level - prev),) * len(ins),
          norm=norm,
          rngs=rngs,
        )
      )
      prev = level
    self.layers = nnx.List(layers)
    self.head = backbone.head(
      backbone.scale(own + old, prev), num_classes, rngs=rngs
    )

  def __call__(self, carry: Any) -> tuple[dict[str, Any], jax.Array]:
    if self.first:
      x, old = carry, None
    else:
      x, old = carry["input"], carry["features"]
    h = self.stem(x)
    new = [h]
    for position, layer in enumerate(self.layers):
      h = layer([h] if old is None else [h, old[position]])
      new.append(h)
    if old is None:
      features = tuple(new)
    else:
      features = tuple(
        jnp.concatenate([o, n], axis=-1) for o, n in zip(old, new, strict=True)
      )
    return {"input": x, "features": features}, self.head(features[-1])


class NestedWidthNet(AnytimeNet):
  """Width-nested network: each stage adds a channel group to every layer.

  Every layer (the stem and the ``depth`` residual layers) is split into K
  channel groups of widths ``w, w, 2w, 4w, ...``, so the total width after
  stage k is ``w * 2**(k-1)``. Group k of layer l reads groups 1..k of layer
  l-1; group j < k never reads group k. Exit k's head reads groups 1..k of
  the last layer, so exit k is a complete network of width ``w * 2**(k-1)``
  and depends only on stages 1..k::

      layer:      stem        1          2   ...   D        exit
      group 1:   [g1] ───> [g1] ───> [g1]  ...  [g1] ──> head 1
                    ╲         ╲         ╲           ╲
      group 2:   [g2] ───> [g2] ───> [g2]  ...  [g2] ──> head 2 (reads g1+g2)
                    ╲ ╲       ╲ ╲       ╲ ╲         ╲
      group 3:   [g3] ───> [g3] ───> [g3]  ...  [g3] ──> head 3 (reads g1..g3)

      (╲ : old groups feed new ones, never the reverse)

  The full-width weight of a layer is thus block-lower-triangular; it is
  built from per-group layers (each group's layer has one linear map on its
  own previous group and one on the concatenation of the older groups), not
  from a mask over a full-width weight. Norms act per group, so old groups
  never see new channels. With the conv backbone, residual layers
  2 .. downsamples+1 halve the resolution and every group doubles its width.

  ``stages[k-1]`` owns group k of the stem and of every layer, and head k.

  With the transformer backbone the nesting is MatFormer's instead (see
  :class:`~osgd_jax.zoo.transformer.MatFormerStage`): one residual width
  ``width``, and each block's attention heads and MLP units split into
  groups; exit k is the transformer made of groups 1..k.

  Carry: stage 1 takes the input batch ``x``. Stage k returns
  ``{"input": x, "features": (h_0, h_1, ..., h_D)}`` where ``h_0`` is the
  stem output and ``h_l`` the output of layer l, each holding groups 1..k
  concatenated on the last (channel) axis.

  Args:
    backbone: what a layer is: :func:`~osgd_jax.zoo.blocks.conv_backbone`
      for NHWC images (a ResNet), :func:`~osgd_jax.zoo.blocks.dense_backbone`
      for feature vectors (an MLP).
    stages: number of stages and exits K.
    width: width ``w`` of group 1 (see :func:`group_widths`).
    depth: number of residual layers ``D``, each split into K groups.
    num_classes: classes of every exit.
    norm: ``batch``, ``group``, ``layer`` or ``none``.
    rngs: the random generators.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from osgd_jax import zoo
    >>> resnet = zoo.NestedWidthNet(
    ...     zoo.conv_backbone(in_channels=3, downsamples=2), stages=3,
    ...     width=4, depth=1, rngs=nnx.Rngs(0))
    >>> resnet(jnp.ones((2, 32, 32, 3))).shape, resnet.depth_per_exit()
    ((3, 2, 10), (1, 1, 1))
    >>> mlp = zoo.NestedWidthNet(zoo.dense_backbone(in_features=64),
    ...                          stages=3, width=8, depth=2, rngs=nnx.Rngs(0))
    >>> mlp(jnp.ones((2, 64)), upto=2).shape
    (2, 2, 10)
  """

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
    # Stage k's layers are as wide as groups 1..k together.
    check_size(
      type(self).__name__,
      stages,
      lambda s: (
        s * depth,
        backbone.scale(sum(group_widths(width, s)), backbone.downsamples),
      ),
    )
    self.backbone = backbone
    self.num_classes = num_classes
    if backbone.kind == "transformer":
      # MatFormer: groups of heads and MLP units, one residual width.
      self.stages = nnx.List(
        [
          MatFormerStage(
            backbone,  # pyright: ignore[reportArgumentType]
            width=width,
            index=k,
            stages=stages,
            depth=depth,
            num_classes=num_classes,
            norm=norm,
            rngs=rngs,
          )
          for k in range(stages)
        ]
      )
      return
    widths = group_widths(width, stages)
    self.stages = nnx.List(
      [
        WidthStage(
          backbone,
          widths=widths,
          index=k,
          depth=depth,
          num_classes=num_classes,
          norm=norm,
          rngs=rngs,
        )
        for k in range(stages)
      ]
    )
