"""The branched family: one trunk, one exit head per stage (the baseline).

:class:`BranchedNet` is the network; :class:`BranchedStage` one of its
stages.
"""

from __future__ import annotations

import jax
from flax import nnx

from osgd_jax.zoo.base import AnytimeNet, check_config, check_size
from osgd_jax.zoo.blocks import Backbone
from osgd_jax.zoo.transformer import share_head

__all__ = ["BranchedStage", "BranchedNet"]


class BranchedStage(nnx.Module):
  """One stage of the trunk: [stem] -> ``depth`` residual layers -> head.

  Args:
    backbone: conv or dense backbone.
    in_features: width of the incoming trunk; ``None`` for stage 1, which
      then starts with a stem on the network input.
    width: width of this stage's layers.
    depth: number of residual layers.
    stride: stride of the first layer (2 halves the resolution).
    num_classes: classes of the exit head.
    norm: normalisation, see :func:`~osgd_jax.zoo.blocks.make_norm`.
    rngs: the random generators.
  """

  def __init__(
    self,
    backbone: Backbone,
    *,
    in_features: int | None,
    width: int,
    depth: int,
    stride: int,
    num_classes: int,
    norm: str,
    rngs: nnx.Rngs,
  ):
    self.depth = depth
    if in_features is None:
      self.stem = backbone.stem(width, norm=norm, rngs=rngs)
      in_features = width
    else:
      self.stem = None
    self.layers = nnx.List(
      [
        backbone.layer(
          (in_features if i == 0 else width,),
          width,
          strides=(stride if i == 0 else 1,),
          norm=norm,
          rngs=rngs,
        )
        for i in range(depth)
      ]
    )
    self.head = backbone.head(width, num_classes, rngs=rngs)

  def __call__(self, carry: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = carry if self.stem is None else self.stem(carry)
    for layer in self.layers:
      h = layer([h])
    return h, self.head(h)


class BranchedNet(AnytimeNet):
  """Branched cascade: a trunk of K stages, exit k a head on stage k.

  The paper's "cascade with branching outputs". Stage k is ``depth``
  residual layers that continue the trunk, and exit k is a head on their
  output::

      x ─ stem ─ [D layers] ─┬─ [D layers] ─┬─ [D layers] ─┬─ ...
                  stage 1    │   stage 2    │   stage 3    │
                           head 1         head 2         head 3

  With the conv backbone the first layer of stages 2 .. downsamples+1 halves
  the resolution and doubles the width (ResNet's phases). Exit k reads only
  the trunk up to stage k, so it never depends on later stages.

  Carry: stage 1 takes the input batch; every stage returns the trunk's
  feature map (or feature vector), a single array, as its carry.

  Args:
    backbone: what a layer is: :func:`~osgd_jax.zoo.blocks.conv_backbone`
      for NHWC images (a ResNet), :func:`~osgd_jax.zoo.blocks.dense_backbone`
      for feature vectors (an MLP).
    stages: number of stages and exits K.
    width: width of stage 1's layers; with the conv backbone, each of
      stages 2 .. downsamples+1 doubles it.
    depth: residual layers per stage.
    num_classes: classes of every exit.
    norm: ``batch``, ``group``, ``layer`` or ``none``.
    rngs: the random generators.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from osgd_jax import zoo
    >>> resnet = zoo.BranchedNet(
    ...     zoo.conv_backbone(in_channels=3, downsamples=2), stages=3,
    ...     width=4, depth=1, rngs=nnx.Rngs(0))
    >>> resnet(jnp.ones((2, 32, 32, 3))).shape, resnet.depth_per_exit()
    ((3, 2, 10), (1, 2, 3))
    >>> mlp = zoo.BranchedNet(zoo.dense_backbone(in_features=64), stages=3,
    ...                       width=8, depth=1, rngs=nnx.Rngs(0))
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
    check_size(
      type(self).__name__,
      stages,
      lambda s: (
        s * depth,
        backbone.scale(width, min(s - 1, backbone.downsamples)),
      ),
    )
    self.backbone = backbone
    self.num_classes = num_classes
    built, in_features, level = [], None, 0
    for k in range(stages):
      new_level = min(k, backbone.downsamples)
      stage_width = backbone.scale(width, new_level)
      built.append(
        BranchedStage(
          backbone,
          in_features=in_features,
          width=stage_width,
          depth=depth,
          stride=2 ** (new_level - level),
          num_classes=num_classes,
          norm=norm,
          rngs=rngs,
        )
      )
      in_features, level = stage_width, new_level
    if getattr(backbone, "shared_head", False):
      built = share_head(
        built,
        backbone,  # pyright: ignore[reportArgumentType]
        num_classes,
        family=type(self).__name__,
        rngs=rngs,
      )
    self.stages = nnx.List(built)
