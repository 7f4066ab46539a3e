"""Width+depth-nested network: each stage doubles the depth and the width.

The interlaced construction of :mod:`osgd_jax.zoo.nested_depth` (stage k+1
adds one new layer after each of the ``n = D * 2**(k-1)`` layers of ``S_k``,
reading the previous new layer and, laterally, the old layer at the same
position), with the new chain of stage k ``2**(k-1)`` times as wide as
stage 1's. Exit k+1 sees every old unit through the lateral inputs and adds
new, wider units at twice the depth::

    stage 1 (width w):   stem ─> L1 ─────> L2 ─────> head 1
                          │       │ o1      │ o2
                          │       ▼         ▼
    stage 2 (width 2w):   └────> N1 ─────> N2 ─────> head 2
    stage 3 (width 4w):   stem ─> M1 ─> M2 ─> M3 ─> M4 ─> head 3
                                  ▲     ▲     ▲     ▲
                                  L1    N1    L2    N2   (lateral inputs)

Old units never read new ones: exit k depends only on stages 1..k.
``stages[k-1]`` owns stage k's layers and head k (stage 1 also the stem).

Carry: as for the depth-nested family, stage 1 takes the input batch and
stage k returns ``{"stem": h_0, "outputs": (o_1, ..., o_n)}``, the stem
output and the outputs of the ``n = D * 2**(k-1)`` layers of ``S_k`` in
sequence order (their widths differ by stage).
"""

from __future__ import annotations

from flax import nnx

from osgd_jax.zoo.base import check_config
from osgd_jax.zoo.blocks import conv_backbone, dense_backbone
from osgd_jax.zoo.nested_depth import InterlacedNet

__all__ = ["NestedWidthDepthResNet", "NestedWidthDepthMLP"]

# Width factor between consecutive stages' chains.
GROWTH = 2


class NestedWidthDepthResNet(InterlacedNet):
  """Width+depth-nested network, ResNet-style conv backbone (NHWC images).

  Args:
    stages: number of stages and exits K.
    width: width of stage 1's blocks at full resolution; stage k's chain is
      ``2**(k-1)`` times wider, and every width doubles with each of the
      ``downsamples``.
    depth: residual blocks of stage 1; exit k has ``depth * 2**(k-1)``.
    num_classes: classes of every exit.
    in_channels: image channels (3 for CIFAR, 1 for digits).
    downsamples: stride-2 halvings, in stage 1's blocks 2, 3, ...
    norm: ``batch``, ``group``, ``layer`` or ``none``.
    rngs: the random generators.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = NestedWidthDepthResNet(stages=3, width=2, depth=1,
    ...                                rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 32, 32, 3))).shape
    (3, 2, 10)
  """

  def __init__(self, *, stages: int = 4, width: int = 8, depth: int = 3,
               num_classes: int = 10, in_channels: int = 3,
               downsamples: int = 2, norm: str = "batch", rngs: nnx.Rngs):
    check_config(stages=stages, width=width, depth=depth,
                 num_classes=num_classes, norm=norm, in_channels=in_channels,
                 downsamples=downsamples)
    super().__init__(
        conv_backbone(in_channels, downsamples), stages=stages, width=width,
        depth=depth, num_classes=num_classes, norm=norm, growth=GROWTH,
        rngs=rngs)


class NestedWidthDepthMLP(InterlacedNet):
  """Width+depth-nested network, MLP backbone (feature vectors).

  Args:
    stages: number of stages and exits K.
    width: width of stage 1's layers; stage k's chain is ``2**(k-1)`` times
      wider.
    depth: residual blocks of stage 1; exit k has ``depth * 2**(k-1)``.
    num_classes: classes of every exit.
    in_features: input features (64 for flattened 8×8 digits).
    norm: ``batch``, ``group``, ``layer`` or ``none``.
    rngs: the random generators.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = NestedWidthDepthMLP(stages=3, width=8, rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 64)), upto=2).shape
    (2, 2, 10)
  """

  def __init__(self, *, stages: int = 4, width: int = 16, depth: int = 1,
               num_classes: int = 10, in_features: int = 64,
               norm: str = "batch", rngs: nnx.Rngs):
    check_config(stages=stages, width=width, depth=depth,
                 num_classes=num_classes, norm=norm, in_features=in_features)
    super().__init__(
        dense_backbone(in_features), stages=stages, width=width, depth=depth,
        num_classes=num_classes, norm=norm, growth=GROWTH, rngs=rngs)
