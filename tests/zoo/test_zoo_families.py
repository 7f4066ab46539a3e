"""The four family classes built directly are the models `zoo.create` builds."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from osgd_jax import zoo

FAMILIES = {
  "branched": zoo.BranchedNet,
  "nested-width": zoo.NestedWidthNet,
  "nested-depth": zoo.NestedDepthNet,
  "nested-width-depth": zoo.NestedWidthDepthNet,
}
SETTINGS = dict(stages=3, width=2, depth=2, num_classes=5, norm="group")
BACKBONES = {
  "resnet": (
    dict(in_channels=1, downsamples=1),
    lambda: zoo.conv_backbone(in_channels=1, downsamples=1),
  ),
  "mlp": (dict(in_features=12), lambda: zoo.dense_backbone(in_features=12)),
}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_class_equals_create(family, backbone):
  name = f"{family}-{backbone}"
  backbone_config, make_backbone = BACKBONES[backbone]
  by_name = zoo.create(name, rngs=nnx.Rngs(7), **SETTINGS, **backbone_config)
  direct = FAMILIES[family](make_backbone(), rngs=nnx.Rngs(7), **SETTINGS)
  assert type(by_name) is type(direct) is FAMILIES[family]
  assert by_name.backbone == direct.backbone == make_backbone()
  assert by_name.num_exits == 3 and by_name.num_classes == 5
  assert nnx.graphdef(by_name) == nnx.graphdef(direct)
  a, b = nnx.state(by_name), nnx.state(direct)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_graph_equality_sees_the_family_and_the_backbone():
  # The comparison above can fail: the width+depth family is not the depth
  # family, and the backbone's settings are part of the graph.
  def build(cls, backbone):
    return nnx.eval_shape(
      lambda: cls(backbone, stages=2, width=2, depth=2, rngs=nnx.Rngs(0))
    )

  conv = zoo.conv_backbone(in_channels=1, downsamples=1)
  depth = nnx.graphdef(build(zoo.NestedDepthNet, conv))
  assert depth != nnx.graphdef(build(zoo.NestedWidthDepthNet, conv))
  assert depth != nnx.graphdef(
    build(zoo.NestedDepthNet, zoo.conv_backbone(in_channels=1, downsamples=0))
  )


def test_width_depth_is_depth_nesting_with_widening_chains():
  # The same construction (same layers, lateral inputs and depth per exit);
  # only the chains' widths differ: stage k's is 2**(k-1) times stage 1's.
  backbone = zoo.dense_backbone(in_features=12)

  def build(cls):
    return nnx.eval_shape(
      lambda: cls(backbone, stages=3, width=2, depth=1, rngs=nnx.Rngs(0))
    )

  depth, both = build(zoo.NestedDepthNet), build(zoo.NestedWidthDepthNet)
  assert depth.depth_per_exit() == both.depth_per_exit() == (1, 2, 4)

  def widths(m):
    return [s.head.linear.in_features for s in m.stages]

  assert widths(depth) == [2, 2, 2] and widths(both) == [2, 4, 8]
