"""The registry of aggregators by name: names, create, options, weightings.

Every name creates a working transformation; unknown names and options are
refused with the valid ones listed; the weightings it hands out (to the CLI,
and to CR-MOGM by name) are the library's own.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import osgd_jax
from osgd_jax import aggregation, weightings
from osgd_jax.aggregation import _registry

# The options a name cannot do without: SDN's weights rise over the run.
REQUIRED = {"sdn": {"total_steps": 10}}
# The names whose transformation, with its defaults, is a pure weighting of
# the Gram matrix: OSGD's, the fixed weighted sums' and the TorchJD ones
# that read nothing else. Not: AdaLoss (the losses), SDN (the step count),
# PCGrad, Random and GradVac (a key), MoDo and SDMGrad (the previous
# weights), Krum (its weighting needs n_byzantine), CR-MOGM (an EMA), and
# the coordinate-wise TrimmedMean, GradDrop and ExcessMTL.
PURE = (
  "aligned-mtl",
  "cagrad",
  "config",
  "dualproj",
  "fairgrad",
  "geometric",
  "imtl-g",
  "linear",
  "mean",
  "mgda",
  "nash-mtl",
  "osgd",
  "pcd",
  "sum",
  "upgrad",
)
PRESETS = ("sum", "mean", "linear", "geometric", "sdn")


def _grads(k=3):
  """Stacked gradients (K, *param.shape) whose rows conflict."""
  rng = np.random.default_rng(0)
  params = {"b": jnp.zeros(6), "w": jnp.zeros((4, 6))}
  grads = {}
  for n, p in params.items():
    rows = rng.normal(size=(k,) + p.shape)
    rows[1] -= 0.8 * rows[0]
    grads[n] = jnp.asarray(rows, jnp.float32)
  return params, grads


def test_names_are_sorted_and_unique():
  """names() is sorted, without repeats, and holds the methods."""
  names = aggregation.names()
  assert list(names) == sorted(set(names)), names
  assert "osgd" in names and "upgrad" in names


@pytest.mark.parametrize("name", aggregation.names())
def test_every_name_creates_a_transformation_of_stacked_grads(name):
  """create(name, num_exits=3) updates (3, *param.shape) gradients.

  (Jitted: one compilation costs less than running the update eagerly.)
  """
  tx = aggregation.create(name, num_exits=3, **REQUIRED.get(name, {}))
  params, grads = _grads()
  updates, state = jax.jit(tx.update)(
    grads, tx.init(params), params, losses=jnp.asarray([2.0, 1.0, 0.5])
  )
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  chex.assert_tree_all_finite((updates, state))


def test_an_unknown_name_is_refused_with_the_valid_names():
  """An unknown name is one line of ValueError listing every valid name."""
  with pytest.raises(ValueError) as info:
    aggregation.create("nope", num_exits=2)
  message = str(info.value)
  assert "'nope'" in message and "\n" not in message, message
  assert ", ".join(aggregation.names()) in message, message


def test_an_unknown_option_is_refused_with_the_valid_options():
  """An option the factory lacks is refused, naming the ones it has."""
  with pytest.raises(ValueError, match=r"'pcgrad' takes no option sed") as info:
    aggregation.create("pcgrad", num_exits=2, sed=1)
  assert ", ".join(aggregation.options("pcgrad")) in str(info.value)


def test_options_are_the_factory_keywords_less_num_exits():
  """options() are the factory's keywords, less num_exits and fixed ones."""
  assert "seed" in aggregation.options("pcgrad")
  assert "num_exits" not in aggregation.options("pcgrad")
  # A preset's name fixes its weights.
  assert "weights" not in aggregation.options("linear")
  assert "total_steps" in aggregation.options("sdn")


def test_the_weighted_sum_presets_are_names():
  """Each weighted-sum preset is a name creating weighted_sum(preset)."""
  assert set(PRESETS) <= set(aggregation.names())
  params, grads = _grads()
  for preset in PRESETS:
    options = REQUIRED.get(preset, {})
    named = aggregation.create(preset, num_exits=3, **options)
    direct = aggregation.weighted_sum(preset, num_exits=3, **options)
    chex.assert_trees_all_equal(
      named.update(grads, named.init(params), params)[0],
      direct.update(grads, direct.init(params), params)[0],
    )


def test_weighting_upgrad_is_the_upgrad_weighting():
  """weighting("upgrad") gives weightings.upgrad's weights on a Gram."""
  rows = np.random.default_rng(0).normal(size=(3, 5))
  rows[1] -= 0.8 * rows[0]
  gram = jnp.asarray(rows @ rows.T, jnp.float32)
  np.testing.assert_array_equal(
    aggregation.weighting("upgrad")(gram), weightings.upgrad(gram)
  )


def test_weighting_names_are_the_names_with_a_pure_weighting():
  """weighting_names() is PURE; weighting() refuses every other name."""
  assert aggregation.weighting_names() == PURE
  for name in set(aggregation.names()) - set(PURE):
    with pytest.raises(ValueError, match=rf"unknown weighting '{name}'"):
      aggregation.weighting(name)


def test_crmogm_by_name_smooths_the_registry_weighting():
  """crmogm("mgda") takes the weights of weighting("mgda"), smoothed."""
  tx = osgd_jax.crmogm("mgda", alpha=0.5, num_exits=2)
  state = tx.init({"w": jnp.zeros(2)})
  want = None
  for g in ([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 3.0]]):
    g = jnp.asarray(g)
    _, state = tx.update({"w": g}, state)
    fresh = np.asarray(aggregation.weighting("mgda")(g @ g.T))
    want = fresh if want is None else 0.5 * want + 0.5 * fresh
    np.testing.assert_allclose(state.weights, want, rtol=1e-5)


def test_crmogm_looks_the_name_up_in_the_registry(monkeypatch):
  """A weighting registered under a name is the one crmogm(name) applies."""

  def first(gram):
    return jnp.zeros(gram.shape[-1]).at[0].set(1.0)

  entry = _registry._ENTRIES["mgda"]
  monkeypatch.setitem(
    _registry._ENTRIES, "mgda", entry._replace(weighting=first)
  )
  tx = osgd_jax.crmogm("mgda", num_exits=2)
  g = {"w": jnp.asarray([[1.0, 0.0], [-1.0, 2.0]])}
  updates, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  np.testing.assert_array_equal(state.weights, [1.0, 0.0])
  np.testing.assert_array_equal(updates["w"], [1.0, 0.0])


def test_weighting_of_an_unknown_name_lists_the_weightings():
  """weighting() of an unknown name lists the names that have one."""
  with pytest.raises(
    ValueError, match=re.escape(", ".join(aggregation.weighting_names()))
  ):
    aggregation.weighting("nope")
