"""The width+depth-nested family: each stage doubles the depth and the width.

:class:`NestedWidthDepthNet` is the depth-nested construction of
:class:`~osgd_jax.zoo.nested_depth.NestedDepthNet` with chains that double
in width from stage to stage.
"""

from __future__ import annotations

from osgd_jax.zoo.nested_depth import NestedDepthNet

__all__ = ["NestedWidthDepthNet"]


class NestedWidthDepthNet(NestedDepthNet):
  """Width+depth-nested network: each stage doubles the depth and the width.

  The interlaced construction of :class:`~osgd_jax.zoo.NestedDepthNet`
  (stage k+1 adds one new layer after each of the ``n = D * 2**(k-1)``
  layers of ``S_k``, reading the previous new layer and, laterally, the old
  layer at the same position), with the new chain of stage k ``2**(k-1)``
  times as wide as stage 1's. Exit k+1 sees every old unit through the
  lateral inputs and adds new, wider units at twice the depth::

      stage 1 (width w):   stem ─> L1 ─────> L2 ─────> head 1
                            │       │ o1      │ o2
                            │       ▼         ▼
      stage 2 (width 2w):   └────> N1 ─────> N2 ─────> head 2
      stage 3 (width 4w):   stem ─> M1 ─> M2 ─> M3 ─> M4 ─> head 3
                                    ▲     ▲     ▲     ▲
                                    L1    N1    L2    N2   (lateral inputs)

  Old units never read new ones: exit k depends only on stages 1..k.
  ``stages[k-1]`` owns stage k's layers and head k (stage 1 also the stem).

  Carry: as for :class:`~osgd_jax.zoo.NestedDepthNet`, stage 1 takes the
  input batch and stage k returns ``{"stem": h_0, "outputs": (o_1, ...,
  o_n)}``, the stem output and the outputs of the ``n = D * 2**(k-1)``
  layers of ``S_k`` in sequence order (their widths differ by stage).

  Args:
    backbone: what a layer is: :func:`~osgd_jax.zoo.blocks.conv_backbone`
      for NHWC images (a ResNet), :func:`~osgd_jax.zoo.blocks.dense_backbone`
      for feature vectors (an MLP).
    stages: number of stages and exits K.
    width: width ``w`` of stage 1's layers (and of the stem); stage k's
      chain is ``2**(k-1)`` times wider (conv: every width doubles per
      halving).
    depth: number of layers ``D`` of stage 1; exit k has ``D * 2**(k-1)``.
    num_classes: classes of every exit.
    norm: ``batch``, ``group``, ``layer`` or ``none``.
    rngs: the random generators.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from osgd_jax import zoo
    >>> resnet = zoo.NestedWidthDepthNet(
    ...     zoo.conv_backbone(in_channels=3, downsamples=2), stages=3,
    ...     width=2, depth=1, rngs=nnx.Rngs(0))
    >>> resnet(jnp.ones((2, 32, 32, 3))).shape, resnet.depth_per_exit()
    ((3, 2, 10), (1, 2, 4))
    >>> mlp = zoo.NestedWidthDepthNet(zoo.dense_backbone(in_features=64),
    ...                               stages=3, width=8, depth=1,
    ...                               rngs=nnx.Rngs(0))
    >>> [stage.head.linear.in_features for stage in mlp.stages]
    [8, 16, 32]
  """

  # Stage k's chain is 2**(k-1) times as wide as stage 1's.
  chain_growth = 2
