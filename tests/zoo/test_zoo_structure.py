"""Structure: depth per exit, stage ownership, CIFAR- and digit-sized shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from osgd_jax import zoo
from osgd_jax.zoo.blocks import ResidualLayer


def abstract(name: str, **config) -> zoo.AnytimeNet:
  return nnx.eval_shape(lambda: zoo.create(name, rngs=nnx.Rngs(0), **config))


def layers_in(modules) -> int:
  return sum(
    isinstance(m, ResidualLayer)
    for module in modules
    for _, m in nnx.iter_modules(module)
  )


@pytest.mark.parametrize("backbone, depth", [("resnet", 1), ("mlp", 2)])
def test_depth_per_exit_of_every_family(backbone, depth):
  config = dict(stages=4, width=2, depth=depth)
  expected = {
    "branched": (depth, 2 * depth, 3 * depth, 4 * depth),
    "nested-width": (depth,) * 4,
    # Interlaced: every stage doubles the depth.
    "nested-depth": (depth, 2 * depth, 4 * depth, 8 * depth),
    "nested-width-depth": (depth, 2 * depth, 4 * depth, 8 * depth),
  }
  for family, depths in expected.items():
    model = abstract(f"{family}-{backbone}", **config)
    assert model.depth_per_exit() == depths, family
    for k in range(1, 5):
      # Count the layers on exit k's path from the structure itself: the
      # residual layers of stages 1..k (width-nested: k groups per position).
      groups = k if family == "nested-width" else 1
      assert layers_in(model.stages[:k]) == depths[k - 1] * groups, family


def test_width_nested_group_widths_double_the_total():
  model = abstract("nested-width-mlp", stages=4, width=3, depth=1)
  heads = [stage.head.linear.kernel.shape[0] for stage in model.stages]
  assert heads == [3, 6, 12, 24]  # groups 3, 3, 6, 12
  groups = [stage.layers[0].linear.kernel.shape[1] for stage in model.stages]
  assert groups == [3, 3, 6, 12]


def test_width_depth_chains_get_wider():
  model = abstract("nested-width-depth-mlp", stages=4, width=3, depth=1)
  widths = [stage.head.linear.kernel.shape[0] for stage in model.stages]
  assert widths == [3, 6, 12, 24]
  model = abstract("nested-depth-mlp", stages=4, width=3, depth=1)
  assert [s.head.linear.kernel.shape[0] for s in model.stages] == [3] * 4


@pytest.mark.parametrize("name", zoo.names())
def test_stage_k_owns_head_k_and_nothing_is_shared(name):
  model = abstract(name, stages=3, width=2, depth=1)
  assert isinstance(model.stages, nnx.List) and len(model.stages) == 3
  params = nnx.state(model, nnx.Param)
  assert set(params.keys()) == {"stages"}  # no parameter outside the stages
  ids = [
    id(v)
    for s in model.stages
    for v in jax.tree.leaves(
      nnx.state(s, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
  ]
  assert len(ids) == len(set(ids))
  for stage in model.stages:
    assert isinstance(stage.head, zoo.Head)


@pytest.mark.parametrize(
  "name", ["nested-depth-resnet", "nested-width-depth-resnet"]
)
def test_cifar_sized_interlaced_resolutions(name):
  # 32x32x3 through two halvings; each new layer works at its lateral
  # input's resolution, striding its chain input when that is coarser.
  model = abstract(name, stages=3, width=2, depth=3, downsamples=2)
  graphdef, state = nnx.split(model)

  def run(state, x):
    model = nnx.merge(graphdef, state)
    carry = model.input_carry(x)
    for stage in model.stages[:2]:
      carry, _ = stage(carry)
    return model.predict(x), carry

  out, carry = jax.eval_shape(
    run, state, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  )
  assert out.shape == (3, 2, 10)
  growth = 2 if name == "nested-width-depth-resnet" else 1
  # S_2 = (L1, N1, L2, N2, L3, N3); widths double per halving.
  expected = [
    (32, 2),
    (32, 2 * growth),
    (16, 4),
    (16, 4 * growth),
    (8, 8),
    (8, 8 * growth),
  ]
  assert [(a.shape[1], a.shape[-1]) for a in carry["outputs"]] == expected
  assert carry["stem"].shape == (2, 32, 32, 2)
