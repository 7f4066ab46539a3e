"""Cost per exit: FLOPs (XLA cost analysis or analytic) and parameters."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_anytime import tiny_setup

from osgd_jax import anytime, zoo

TINY = dict(stages=3, width=2, depth=1)


def tiny(name: str, **config) -> zoo.AnytimeNet:
  preset, config = tiny_setup(name, **{**TINY, **config})
  return nnx.eval_shape(
    lambda: zoo.create(name, rngs=nnx.Rngs(0), preset=preset, **config)
  )


def input_shape(name: str) -> tuple[int, ...]:
  preset, config = tiny_setup(name, **TINY)
  return (1, *zoo.input_spec(name, preset, **config).shape)


@pytest.mark.parametrize("name", zoo.names())
def test_analytic_flops_and_params_strictly_increase(name):
  model = tiny(name)
  cost = anytime.flops_per_exit(model, input_shape(name), source="analytic")
  assert cost.source == "analytic" and cost.flops.shape == (3,)
  assert np.all(np.diff(cost.flops) > 0), cost.flops
  params = anytime.params_per_exit(model)
  assert params.shape == (3,) and np.all(np.diff(params) > 0), params
  stage_counts = [
    sum(a.size for a in jax.tree.leaves(nnx.state(s, nnx.Param)))
    for s in model.stages
  ]
  np.testing.assert_array_equal(params, np.cumsum(stage_counts))
  total = sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert params[-1] == total


@pytest.mark.parametrize("name", ["nested-depth-resnet"])
def test_xla_cost_analysis_on_cpu(name):
  model = tiny(name)
  cost = anytime.flops_per_exit(model, input_shape(name))  # "auto"
  assert cost.source == "xla"  # the CPU backend reports FLOPs
  assert cost.flops.shape == (3,) and np.all(np.diff(cost.flops) > 0)
  analytic = anytime.flops_per_exit(
    model, input_shape(name), source="analytic"
  ).flops
  # XLA also counts element-wise work; the matmuls and convs dominate.
  assert np.all(cost.flops > 0.5 * analytic)
  assert np.all(cost.flops < 3.0 * analytic)


def test_analytic_count_matches_a_hand_count():
  # branched MLP, no norm: stem 64->w, per stage one residual layer with two
  # w->w maps, and a w->10 head; 2 FLOPs per multiply-add; batch 5.
  w = 3
  model = tiny("branched-mlp", width=w, norm="none")
  flops = anytime.flops_per_exit(model, (5, 64), source="analytic").flops
  stage = 2 * w * w + w * 10
  expected = 2 * 5 * (64 * w + np.cumsum([stage] * 3))
  np.testing.assert_array_equal(flops, expected)


def test_flops_scale_with_the_batch():
  model = tiny("nested-width-resnet")
  one = anytime.flops_per_exit(model, (1, 8, 8, 1), source="analytic").flops
  four = anytime.flops_per_exit(model, (4, 8, 8, 1), source="analytic").flops
  np.testing.assert_allclose(four, 4 * one)


def test_flops_follow_the_mode_width_and_batch_of_each_call():
  """Counts are reused per model structure, never across what changes them.

  BatchNorm's train mode also computes batch statistics, a wider model
  costs more, and a model of the same structure costs the same.
  """
  train = tiny("nested-width-resnet", norm="batch")
  first = anytime.flops_per_exit(train, (2, 8, 8, 1)).flops
  twin = anytime.flops_per_exit(
    tiny("nested-width-resnet", norm="batch"), (2, 8, 8, 1)
  ).flops
  np.testing.assert_array_equal(twin, first)
  train.eval()
  evaluated = anytime.flops_per_exit(train, (2, 8, 8, 1)).flops
  assert np.all(evaluated < first), (evaluated, first)
  train.train()
  np.testing.assert_array_equal(
    anytime.flops_per_exit(train, (2, 8, 8, 1)).flops, first
  )
  wide = tiny("nested-width-resnet", norm="batch", width=8)
  assert np.all(anytime.flops_per_exit(wide, (2, 8, 8, 1)).flops > first)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(input_shape=(64,)), "batch axis included"),
    (dict(input_shape=(0, 64)), "batch axis included"),
    (dict(input_shape=(1, 63)), r"expects a batch of shape \(batch, 64\)"),
    (dict(input_shape=(1, 64), source="hlo"), "source must be one of"),
  ],
)
def test_flops_errors(kwargs, match):
  model = tiny("branched-mlp")
  with pytest.raises(ValueError, match=match):
    anytime.flops_per_exit(model, **kwargs)


def test_params_per_exit_needs_stages():
  with pytest.raises(ValueError, match="staged model"):
    anytime.params_per_exit(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_xla_source_without_a_cost_analysis_is_an_error(monkeypatch):
  # A backend whose cost analysis has no FLOP count: "auto" falls back to the
  # analytic count, "xla" says so.
  model = zoo.create("nested-width-mlp", rngs=nnx.Rngs(0), width=4)
  monkeypatch.setattr(anytime, "_xla_flops", lambda *args: None)
  assert anytime.flops_per_exit(model, (1, 64)).source == "analytic"
  with pytest.raises(
    ValueError, match="no FLOP count on this backend.*source='analytic'"
  ):
    anytime.flops_per_exit(model, (1, 64), source="xla")
