"""The Optax contract, for every transformation of the library.

One harness runs every transformation, built with its documented defaults
(plus ``num_exits``), through the same cases, as Optax's contrib common
tests do: jit and no jit (chex's variants), ``lax.scan`` over steps, an Orbax
save restored onto ``tx.init(params)``, ``optax.inject_hyperparams``, dtypes,
shardings typed on an ``Explicit`` mesh, ``nnx.Optimizer``, ``jax.export``
for every platform, and the diagnostics found by name. TorchJD's
aggregators go through the cases that only this harness has, and through
one scan each; the first baselines train a zoo model in a jitted chain.

Each transformation, and its jitted update, is made once for the module, so
the cases that run the same update on the same shapes compile it once.
(Each method's numerics are in its own test_<method>.py.)
"""

from __future__ import annotations

import functools
import os
import re
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import stacked_cases
from absl.testing import parameterized
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from tiny_anytime import TwoExitNet

import osgd_jax
from osgd_jax import zoo

K = 3
STEPS = 3
PARAM_SHAPES = {"b": (6,), "w": (4, 6)}


def _by_norm(gram):
  """A user's weighting: exit k weighted by its share of ‖g‖² (sums to K)."""
  sq = jnp.diagonal(gram)
  return gram.shape[-1] * sq / jnp.maximum(sq.sum(), 1e-30)


def _user_weighting(num_exits=None, granularity="global"):
  return osgd_jax.from_weighting(
    _by_norm, num_exits=num_exits, granularity=granularity
  )


# (name, factory, arguments, static_args for optax.inject_hyperparams).
TRANSFORMS = (
  ("osgd", osgd_jax.osgd, {}, ("num_exits",)),
  (
    "osgd_sequential_global",
    osgd_jax.osgd,
    {"method": "sequential", "granularity": "global"},
    ("num_exits",),
  ),
  ("osgd_sgd", osgd_jax.osgd_sgd, {"learning_rate": 0.1}, ("num_exits",)),
  # Switches to the sum within the STEPS of the scan and Orbax cases.
  (
    "osgd_sgd_switch",
    osgd_jax.osgd_sgd,
    {"learning_rate": 0.1, "sgd_after": 2},
    ("num_exits",),
  ),
  ("weighted_sum", osgd_jax.weighted_sum, {}, ("num_exits",)),
  (
    "weighted_sum_sdn",
    osgd_jax.weighted_sum,
    {"weights": "sdn", "total_steps": 10},
    ("num_exits", "total_steps"),
  ),
  (
    "adaptive_loss_balancing",
    osgd_jax.adaptive_loss_balancing,
    {},
    ("num_exits",),
  ),
  ("pcgrad", osgd_jax.pcgrad, {}, ("num_exits", "seed")),
  ("mgda", osgd_jax.mgda, {}, ("num_exits", "max_iter")),
  ("upgrad", osgd_jax.upgrad, {}, ("num_exits", "max_iter")),
  ("from_weighting", _user_weighting, {}, ("num_exits",)),
)
NAMED = [dict(testcase_name=name, name=name) for name, *_ in TRANSFORMS]

# TorchJD's aggregators (issue 20). The whole harness would cost seconds per
# transformation; their jit, scan, state-structure, sharding and diagnostics
# checks are the module-level tests at the end of this file, and here they
# go through the cases that only this harness has: Orbax,
# inject_hyperparams and nnx.Optimizer.
TORCHJD_TRANSFORMS = tuple(
  (name, getattr(osgd_jax.aggregation, name), {}, ("num_exits",) + extra)
  for name, extra in (
    ("random_weighting", ("seed",)),
    ("imtl_g", ()),
    ("aligned_mtl", ()),
    ("krum", ("n_byzantine", "n_selected")),
    ("dualproj", ("max_iter",)),
    ("gradvac", ("seed",)),
    ("cagrad", ("bisections", "max_iter")),
    ("config", ()),
    ("fairgrad", ("max_iter",)),
    ("modo", ()),
    ("sdmgrad", ("n_iter",)),
    ("pcd", ("max_iter",)),
    ("nash_mtl", ("update_weights_every", "max_iter")),
    ("crmogm", ("weighting",)),
    ("trimmed_mean", ("trim_number",)),
    ("graddrop", ("seed",)),
    ("excess_mtl", ("n_warmup_steps",)),
  )
)
# With the two exits of the nnx.Optimizer case, TrimmedMean trims none; Krum
# needs three exits at least, so it is not in that case.
TWO_EXIT_KWARGS = {"trimmed_mean": {"trim_number": 0}}
WITH_TORCHJD = NAMED + [
  dict(testcase_name=name, name=name) for name, *_ in TORCHJD_TRANSFORMS
]
WITH_TWO_EXIT_TORCHJD = [
  case for case in WITH_TORCHJD if case["name"] != "krum"
]
_BY_NAME = {
  name: (factory, kwargs, static)
  for name, factory, kwargs, static in TRANSFORMS + TORCHJD_TRANSFORMS
}


@functools.cache
def _make(name, num_exits=K):
  factory, kwargs, _ = _BY_NAME[name]
  if num_exits == 2:
    kwargs = dict(kwargs, **TWO_EXIT_KWARGS.get(name, {}))
  return factory(num_exits=num_exits, **kwargs)


@functools.cache
def _jitted(name):
  """``jax.jit(_make(name).update)``, one for every case that runs it."""
  return jax.jit(_make(name).update)


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {
    n: jnp.asarray(rng.normal(size=s), dtype) for n, s in PARAM_SHAPES.items()
  }


def _grads(step, dtype=jnp.float32):
  """Stacked per-exit gradients whose rows conflict, different every step."""
  rng = np.random.default_rng(step + 1)
  out = {}
  for n, s in PARAM_SHAPES.items():
    rows = rng.normal(size=(K,) + s)
    rows[1] -= 0.8 * rows[0]
    out[n] = jnp.asarray(rows, dtype)
  return out


def _losses(step):
  return jnp.asarray([1.0 + step, 2.0, 0.5], jnp.float32)


def _types(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def _run(update, state, params, steps=STEPS, dtype=jnp.float32):
  outs = []
  for step in range(steps):
    updates, state = update(
      _grads(step, dtype), state, params, losses=_losses(step)
    )
    outs.append(updates)
  return outs, state


class TransformContractTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(NAMED)
  def test_state_keeps_structure_shapes_and_dtypes(self, name):
    tx, params = _make(name), _params()
    state = tx.init(params)
    outs, new_state = _run(self.variant(tx.update), state, params)
    chex.assert_trees_all_equal_structs(state, new_state)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
    for updates in outs:
      chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
      chex.assert_tree_all_finite(updates)
    chex.assert_tree_all_finite(new_state)

  @parameterized.named_parameters(NAMED)
  def test_lax_scan_over_steps_equals_a_python_loop(self, name):
    tx, params = _make(name), _params()
    grads = jax.tree.map(
      lambda *g: jnp.stack(g), *[_grads(step) for step in range(STEPS)]
    )
    losses = jnp.stack([_losses(step) for step in range(STEPS)])

    def step(state, inputs):
      g, step_losses = inputs
      updates, state = tx.update(g, state, params, losses=step_losses)
      return state, updates

    scanned_state, scanned = jax.jit(
      lambda s: jax.lax.scan(step, s, (grads, losses))
    )(tx.init(params))
    looped, looped_state = _run(_jitted(name), tx.init(params), params)
    chex.assert_trees_all_close(
      scanned,
      jax.tree.map(lambda *u: jnp.stack(u), *looped),
      rtol=1e-5,
      atol=1e-6,
    )
    chex.assert_trees_all_close(
      scanned_state, looped_state, rtol=1e-5, atol=1e-6
    )

  @parameterized.named_parameters(WITH_TORCHJD)
  def test_orbax_round_trip_onto_a_fresh_init(self, name):
    tx, params = _make(name), _params()
    update = _jitted(name)
    _, state = _run(update, tx.init(params), params, steps=2)
    with (
      tempfile.TemporaryDirectory() as directory,
      ocp.StandardCheckpointer() as checkpointer,
    ):
      path = os.path.join(directory, "state")
      checkpointer.save(path, state)
      checkpointer.wait_until_finished()
      restored = checkpointer.restore(path, tx.init(params))
    chex.assert_trees_all_equal_structs(restored, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(restored, state)
    chex.assert_trees_all_equal(restored, state)
    # Training goes on from the restored state exactly as from the original.
    step = 2
    args = (_grads(step), params)
    chex.assert_trees_all_equal(
      update(args[0], restored, params, losses=_losses(step)),
      update(args[0], state, params, losses=_losses(step)),
    )

  @parameterized.named_parameters(WITH_TORCHJD)
  def test_inject_hyperparams_gives_the_same_updates(self, name):
    factory, kwargs, static = _BY_NAME[name]
    injected = optax.inject_hyperparams(factory, static_args=static)(
      num_exits=K, **kwargs
    )
    params = _params()
    state = injected.init(params)
    outs, new_state = _run(jax.jit(injected.update), state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
    plain, _ = _run(_jitted(name), _make(name).init(params), params)
    chex.assert_trees_all_close(outs, plain, rtol=1e-5, atol=1e-6)

  @parameterized.named_parameters(NAMED)
  def test_low_precision_dtypes_are_kept(self, name):
    tx, params = _make(name), _params(jnp.bfloat16)
    state = tx.init(params)
    outs, new_state = _run(_jitted(name), state, params, dtype=jnp.bfloat16)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
    for updates in outs:
      chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
      chex.assert_tree_all_finite(updates)

  @parameterized.named_parameters(NAMED)
  def test_sharding_types_are_stable_on_an_explicit_mesh(self, name):
    mesh = jax.make_mesh(
      (4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2
    )
    tx = _make(name)

    def put(x, *spec):
      return jax.device_put(x, NamedSharding(mesh, P(*spec)))

    with jax.set_mesh(mesh):
      params = {
        "b": put(_params()["b"], "model"),
        "w": put(_params()["w"], None, "model"),
      }
      grads = {
        "b": put(_grads(0)["b"], None, "model"),
        "w": put(_grads(0)["w"], None, None, "model"),
      }
      state0 = tx.init(params)
      updates, state1 = tx.update(grads, state0, params, losses=_losses(0))
      jitted_updates, state2 = jax.jit(tx.update)(
        grads, state0, params, losses=_losses(0)
      )

      def types(tree):
        return jax.tree.map(jax.typeof, tree)

      chex.assert_trees_all_equal(types(state0), types(state1))
      chex.assert_trees_all_equal(
        types(state0), types(jax.jit(tx.init)(params))
      )
      chex.assert_trees_all_equal(types(state1), types(state2))
      # The update is split like the parameters, never gathered.
      chex.assert_trees_all_equal(types(updates), types(params))
      chex.assert_trees_all_equal(types(jitted_updates), types(params))

  @parameterized.named_parameters(WITH_TWO_EXIT_TORCHJD)
  def test_nnx_optimizer_updates_a_two_exit_model(self, name):
    model = TwoExitNet(nnx.Rngs(0), in_features=4, width=8, classes=2)
    tx = _make(name, num_exits=2)
    if not name.startswith("osgd_sgd"):  # a whole optimizer already
      tx = optax.chain(tx, optax.sgd(0.05))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
    y = jnp.arange(8) % 2

    @nnx.jit
    def train_step(model, optimizer):
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)

      def exit_losses(params):
        logits = nnx.merge(graphdef, params, rest)(x)
        labels = jnp.broadcast_to(y, logits.shape[:-1])
        return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels
        ).mean(-1)

      losses, grads = osgd_jax.value_and_per_exit_grads(exit_losses)(params)
      optimizer.update(model, grads, losses=losses)
      return losses

    before = _types(nnx.state(optimizer))
    first = train_step(model, optimizer)
    for _ in range(20):
      last = train_step(model, optimizer)
    assert _types(nnx.state(optimizer)) == before
    assert float(last.sum()) < float(first.sum()), (first, last)

  @parameterized.named_parameters(NAMED)
  def test_exports_for_every_platform_from_this_host(self, name):
    tx, params = _make(name), _params()
    state = tx.init(params)
    args = (_grads(0), state, params)
    jitted = jax.jit(lambda g, s, p: tx.update(g, s, p, losses=_losses(0)))
    exported = jax.export.export(jitted, platforms=("cpu", "cuda", "tpu"))(
      *args
    )
    assert exported.platforms == ("cpu", "cuda", "tpu")
    chex.assert_trees_all_close(
      exported.call(*args), jitted(*args), rtol=1e-6, atol=1e-6
    )
    if name.startswith("osgd"):
      text = jitted.lower(*args).as_text()
      assert not re.search(r"custom_call", text), re.findall(
        r"custom_call @\w+", text
      )

  @parameterized.named_parameters(NAMED)
  def test_diagnostics_are_found_by_name(self, name):
    tx, params = _make(name), _params()
    _, state = _run(_jitted(name), tx.init(params), params, steps=1)
    grads = _grads(0)
    rows = np.concatenate(
      [np.asarray(grads[n]).reshape(K, -1) for n in sorted(grads)], axis=1
    )
    norms = np.linalg.norm(rows, axis=1)
    np.testing.assert_allclose(
      optax.tree_utils.tree_get(state, "exit_norms"), norms, rtol=1e-5
    )
    np.testing.assert_allclose(
      optax.tree_utils.tree_get(state, "cosine"),
      rows @ rows.T / np.outer(norms, norms),
      rtol=1e-5,
      atol=1e-6,
    )
    assert optax.tree_utils.tree_get(state, "weights").shape == (K,)


# --- TorchJD's aggregators: jit, scan, state and sharding ---------------------
# One contract check each: the whole harness above costs about ten seconds
# per transformation, and covers from_weighting itself.

TORCHJD_K = 4
# Built by from_weighting, with one group per leaf.
LEAF_TRANSFORMS = {
  "random_weighting": osgd_jax.random_weighting,
  "imtl_g": osgd_jax.imtl_g,
  "aligned_mtl": osgd_jax.aligned_mtl,
  "krum": osgd_jax.krum,
  "dualproj": osgd_jax.dualproj,
  "gradvac": osgd_jax.gradvac,
  "cagrad": osgd_jax.cagrad,
  "config": osgd_jax.aggregation.config,
  "fairgrad": osgd_jax.fairgrad,
  "modo": osgd_jax.modo,
  "sdmgrad": osgd_jax.sdmgrad,
  "crmogm": osgd_jax.crmogm,
  "pcd": osgd_jax.pcd,
}
# Coordinate-wise, or one group by construction: no granularity.
COORDINATEWISE = {
  "nash_mtl": osgd_jax.nash_mtl,
  "trimmed_mean": osgd_jax.trimmed_mean,
  "graddrop": osgd_jax.graddrop,
  "excess_mtl": osgd_jax.excess_mtl,
}


@pytest.mark.parametrize(
  "name", sorted(LEAF_TRANSFORMS) + sorted(COORDINATEWISE)
)
def test_transform_scans_and_keeps_its_state(name):
  """jit + lax.scan over steps; the state keeps its structure and dtypes."""
  k = TORCHJD_K
  tx = (
    LEAF_TRANSFORMS[name](num_exits=k, granularity="leaf")
    if name in LEAF_TRANSFORMS
    else COORDINATEWISE[name](num_exits=k)
  )
  params = {"b": jnp.zeros(3), "w": jnp.zeros((2, 3))}
  rng = np.random.default_rng(0)
  grads = {
    n: jnp.asarray(rng.normal(size=(3, k) + p.shape), jnp.float32)
    for n, p in params.items()
  }

  def step(state, g):
    updates, state = tx.update(g, state, params)
    return state, updates

  state0 = tx.init(params)
  state, updates = jax.jit(lambda s: jax.lax.scan(step, s, grads))(state0)
  chex.assert_trees_all_equal_structs(state0, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, state)
  chex.assert_tree_all_finite((state, updates))
  chex.assert_trees_all_equal_shapes(
    updates, jax.tree.map(lambda p: jnp.zeros((3,) + p.shape), params)
  )
  for field, shape in (
    ("weights", (k,)),
    ("exit_norms", (k,)),
    ("cosine", (k, k)),
  ):
    assert optax.tree_utils.tree_get(state, field).shape == shape, field


def test_coordinatewise_states_keep_their_sharding_types():
  """The transformations not built by from_weighting, on an Explicit mesh.

  (The harness above runs every case on from_weighting's; these few cases
  cost a fraction of it.)
  """
  k = TORCHJD_K
  mesh = jax.make_mesh(
    (4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2
  )

  def put(x, *spec):
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))

  def types(tree):
    return jax.tree.map(jax.typeof, tree)

  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh):
    params = {
      "b": put(jnp.zeros(6), "model"),
      "w": put(jnp.zeros((4, 6)), None, "model"),
    }
    grads = {
      "b": put(
        jnp.asarray(rng.normal(size=(k, 6)), jnp.float32), None, "model"
      ),
      "w": put(
        jnp.asarray(rng.normal(size=(k, 4, 6)), jnp.float32),
        None,
        None,
        "model",
      ),
    }
    for tx in (
      osgd_jax.graddrop(num_exits=k),
      osgd_jax.excess_mtl(num_exits=k),
      osgd_jax.trimmed_mean(num_exits=k),
    ):
      state0 = tx.init(params)
      updates, state1 = jax.jit(tx.update)(grads, state0, params)
      chex.assert_trees_all_equal(types(state0), types(state1))
      chex.assert_trees_all_equal(types(updates), types(params))


# --- the first baselines in a training step -----------------------------------


@functools.cache
def _zoo_task():
  """A 3-exit zoo model, a batch and its jitted per-exit gradients.

  Compiled once for all aggregators: the model's forward and vmapped VJP
  cost more to compile than any aggregator.
  """
  model = zoo.create("branched-mlp", rngs=nnx.Rngs(0), stages=3, width=8)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grads_fn = jax.jit(
    osgd_jax.value_and_per_exit_grads(
      zoo.per_exit_loss_fn(graphdef), has_aux=True
    )
  )
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=64), jnp.int32)
  return params, rest, lambda p, r: grads_fn(p, r, x, y)


@pytest.mark.parametrize("name", sorted(stacked_cases.FACTORIES))
def test_jitted_chain_with_momentum_on_zoo_model(name):
  params, rest, grads_fn = _zoo_task()
  options = (
    {"weights": "sdn", "total_steps": 10} if name == "weighted_sum" else {}
  )
  tx = optax.chain(
    stacked_cases.FACTORIES[name](num_exits=3, **options),
    optax.add_decayed_weights(1e-4),
    optax.sgd(0.1, momentum=0.9),
  )
  update = jax.jit(tx.update)
  state = tx.init(params)
  shapes = jax.tree.map(jnp.shape, state)
  first = None
  for _ in range(8):
    (losses, rest), grads = grads_fn(params, rest)
    updates, state = update(grads, state, params, losses=losses)
    params = optax.apply_updates(params, updates)
    first = losses if first is None else first
  (losses, _), _ = grads_fn(params, rest)
  assert stacked_cases.finite((params, state, losses))
  assert jax.tree.map(jnp.shape, state) == shapes  # fixed by num_exits
  assert float(losses.mean()) < float(first.mean()), (first, losses)
