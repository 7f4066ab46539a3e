"""The Gramian engine: the same updates and states as from stacked gradients.

Every Gram weighting of the registry, given a :class:`osgd_jax.Gramian` in
place of the stacked gradients, must return the same update and state; the
coordinate methods must refuse it in one line. OSGD from a Gramian is checked
against a float64 NumPy Gram–Schmidt on the explicit Jacobian of a model
whose gradients have a closed form; the staged twin on a zoo model with
BatchNorm in train mode; the memory bounds structurally from XLA's compiled
memory analysis; the sharded step against the unsharded one.
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
import numpy_oracles
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxpr_walk import inputs_reached

import osgd_jax
from osgd_jax import aggregation, zoo

K = 3
# The methods that read every coordinate of the gradients: they refuse a
# Gramian. Every other registered name must accept it.
COORDINATE_METHODS = {"excess-mtl", "graddrop", "trimmed-mean"}
REQUIRED = {"sdn": {"total_steps": 10}}


def _setup(dtype=np.float64, seed=0):
  """A two-layer network with three exits, its params and a batch."""
  rng = np.random.default_rng(seed)
  params = {
    "a": {"w": rng.normal(size=(5, 4)).astype(dtype)},
    "b": rng.normal(size=(4,)).astype(dtype),
  }
  x = rng.normal(size=(7, 5)).astype(dtype)
  return jax.tree.map(jnp.asarray, params), jnp.asarray(x)


def _loss_fn(p, x):
  h = jnp.tanh(x @ p["a"]["w"])
  return jnp.stack(
    [
      jnp.mean(h**2),
      jnp.mean((h @ p["b"]) ** 2),
      jnp.mean(jnp.sin(h @ p["b"]) + h[:, 0]),
    ]
  )


def _max_diff(a, b):
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
  return max(
    float(jnp.max(jnp.abs(jnp.asarray(u, jnp.float64) - v)))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def _create(name, granularity):
  options = dict(REQUIRED.get(name, {}))
  # Named even where it is the default: osgd's default is "leaf".
  if "granularity" in aggregation.options(name):
    options["granularity"] = granularity
  elif granularity != "global":
    return None
  return aggregation.create(name, num_exits=K, **options)


def _linear_setup():
  """K linear losses of two leaves: rows that conflict, one nearly collinear.

  The registry sweep compares weightings, not models: a linear loss keeps
  each method's program small (the engines are checked on real models by
  the tests below).
  """
  rng = np.random.default_rng(2)
  rows = rng.normal(size=(K, 6))
  rows[1] -= 0.8 * rows[0]
  rows[2] = rows[0] + 1e-2 * rows[2]
  params = {"a": {"w": jnp.asarray(rng.normal(size=(2, 2)))}, "b": jnp.ones(2)}

  def loss_fn(p, rows):
    flat = jnp.concatenate([p["a"]["w"].ravel(), p["b"]])
    return rows @ flat + jnp.arange(1.0, K + 1)

  return params, jnp.asarray(rows), loss_fn


@pytest.mark.parametrize("granularity", ["global", "leaf"])
def test_every_gram_weighting_takes_a_gramian(granularity):
  """Same update and state, float64 within 1e-10; coordinates refuse."""
  with jax.enable_x64(True):
    params, rows, loss_fn = _linear_setup()
    losses, stacked = osgd_jax.value_and_per_exit_grads(loss_fn)(params, rows)
    _, gramian = osgd_jax.value_and_gramian(loss_fn, form="vmap")(params, rows)
    refused = set()
    for name in aggregation.names():
      tx = _create(name, granularity)
      if tx is None:
        continue
      state = tx.init(params)
      if name in COORDINATE_METHODS:
        with pytest.raises(ValueError, match="value_and_per_exit_grads"):
          tx.update(gramian, state, params, losses=losses)
        refused.add(name)
        continue
      # One compile per method for both inputs.
      expected, got = jax.jit(
        lambda s, g, tx=tx: (
          tx.update(stacked, s, params, losses=losses),
          tx.update(g, s, params, losses=losses),
        )
      )(state, gramian)
      assert _max_diff(got, expected) <= 1e-10, name
    assert refused == {
      n for n in COORDINATE_METHODS if _create(n, granularity) is not None
    }


@pytest.mark.parametrize("form", ["vmap", "scan", "blocks", "auto"])
@pytest.mark.parametrize("granularity", ["global", "leaf"])
def test_osgd_from_a_gramian_is_gram_schmidt_on_the_explicit_jacobian(
  form, granularity
):
  """Least squares per exit: g_k = X_kᵀ(X_k θ − y_k), in NumPy."""
  rng = np.random.default_rng(3)
  xs = rng.normal(size=(K, 6, 5))
  ys = rng.normal(size=(K, 6))
  xs[2] = xs[0] + 1e-3 * xs[2]  # nearly collinear with exit 1: a real test
  theta = {"u": rng.normal(size=(3,)), "v": rng.normal(size=(2,))}

  def loss_fn(p, xs, ys):
    t = jnp.concatenate([p["u"], p["v"]])
    return 0.5 * jnp.sum((xs @ t - ys) ** 2, axis=-1)

  t = np.concatenate([theta["u"], theta["v"]])
  rows = np.stack([xs[k].T @ (xs[k] @ t - ys[k]) for k in range(K)])
  leaves = [rows[:, :3], rows[:, 3:]]
  expected = numpy_oracles.osgd_direction(
    leaves, tol=1e-6, granularity=granularity
  )
  with jax.enable_x64(True):
    p = jax.tree.map(jnp.asarray, theta)
    _, gramian = jax.jit(osgd_jax.value_and_gramian(loss_fn, form=form))(
      p, jnp.asarray(xs), jnp.asarray(ys)
    )
    tx = osgd_jax.osgd(num_exits=K, granularity=granularity, tol=1e-6)
    update, _ = jax.jit(tx.update)(gramian, tx.init(p), p)
  np.testing.assert_allclose(update["u"], expected[0], rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(update["v"], expected[1], rtol=1e-9, atol=1e-12)


def test_the_forms_agree_in_float32():
  params, x = _setup(np.float32)
  _, stacked = osgd_jax.value_and_per_exit_grads(_loss_fn)(params, x)
  txs = {
    g: osgd_jax.osgd(num_exits=K, granularity=g) for g in ("global", "leaf")
  }

  @jax.jit
  def updates(params, x, stacked):
    out = {}
    for granularity, tx in txs.items():
      out[granularity, "stacked"] = tx.update(stacked, tx.init(params), params)
      for form in ("vmap", "scan", "blocks"):
        _, gramian = osgd_jax.value_and_gramian(_loss_fn, form=form)(params, x)
        out[granularity, form] = tx.update(gramian, tx.init(params), params)
    return out

  out = updates(params, x, stacked)
  for (granularity, _form), got in out.items():
    chex.assert_trees_all_close(
      got, out[granularity, "stacked"], rtol=1e-5, atol=1e-6
    )


def _scaled_loss_fn(p, x, scale):
  """``_loss_fn`` times ``scale``: gradients of that magnitude."""
  return scale * _loss_fn(p, x)


def test_k1_is_the_identity_at_any_scale_through_a_gramian():
  """K = 1, gradients 1e-30 to 1e30: the update is the gradient itself.

  An unscaled Gram matrix overflows (or underflows) float32 there, which
  gave a zero or NaN update.
  """
  params, x = _setup(np.float32)
  txs = {
    g: osgd_jax.osgd(num_exits=1, granularity=g) for g in ("global", "leaf")
  }

  @jax.jit
  def run(params, x, scale):
    def loss_fn(p, x):
      return _scaled_loss_fn(p, x, scale)[:1]

    grads = jax.grad(lambda p: loss_fn(p, x)[0])(params)
    out = {}
    for granularity, tx in txs.items():
      for form in ("vmap", "scan", "blocks"):
        _, gramian = osgd_jax.value_and_gramian(loss_fn, form=form)(params, x)
        out[granularity, form] = tx.update(gramian, tx.init(params), params)[0]
    return grads, out

  for scale in (1e-30, 1e-20, 1.0, 1e20, 1e30):
    grads, out = run(params, x, jnp.float32(scale))
    for got in out.values():
      chex.assert_trees_all_close(got, grads, rtol=1e-6, atol=0)


def test_exploding_gradients_through_a_gramian_match_the_stack():
  """Norm ~1e20 (the squared norm overflows float32): every form = stack."""
  params, x = _setup(np.float32)
  scale = jnp.float32(1e20)
  txs = [
    make(num_exits=K, granularity=granularity)
    for granularity in ("global", "leaf")
    for make in (osgd_jax.osgd, aggregation.upgrad)
  ]

  @jax.jit
  def run(params, x, scale):
    def loss_fn(p, x):
      return _scaled_loss_fn(p, x, scale)

    _, stacked = osgd_jax.value_and_per_exit_grads(loss_fn)(params, x)
    out = []
    for form in ("vmap", "scan", "blocks"):
      _, gramian = osgd_jax.value_and_gramian(loss_fn, form=form)(params, x)
      out += [
        (
          tx.update(stacked, tx.init(params), params),
          tx.update(gramian, tx.init(params), params),
        )
        for tx in txs
      ]
    return out

  for expected, got in run(params, x, scale):
    # The update is finite (a diagnostic of squared norms may be inf).
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(got[0]))
    assert float(jnp.max(jnp.abs(expected[0]["b"]))) > 1e18
    # float32 rounding relative to the update's scale (~1e19).
    chex.assert_trees_all_close(got[0], expected[0], rtol=1e-5, atol=1e14)
    chex.assert_trees_all_close(got[1], expected[1], rtol=1e-5, atol=1e-6)


def _bn_model():
  model = zoo.create(
    "nested-depth-mlp", rngs=nnx.Rngs(0), width=8, stages=K, norm="batch"
  )
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 64)), jnp.float32)
  return model, graphdef, params, rest, x, jnp.arange(6) % 10


def _ce(logits, y):
  return osgd_jax.per_exit_cross_entropy(logits, y)


def test_staged_gramian_on_a_batchnorm_zoo_model():
  """Staged Gramian = staged stack, BatchNorm statistics updated once.

  Both forms (rows kept, pullbacks replayed) and both granularities of
  OSGD, traced into one program (UPGrad and the rest are compared on
  the same reader by the registry sweep).
  """
  model, graphdef, params, rest, x, y = _bn_model()
  txs = [osgd_jax.osgd(num_exits=K, granularity=g) for g in ("global", "leaf")]

  @jax.jit
  def run(params, rest, x, y):
    (_, rest_s), stacked = osgd_jax.staged_value_and_per_exit_grads(
      graphdef, _ce
    )(params, rest, x, y)
    expected = [tx.update(stacked, tx.init(params), params) for tx in txs]
    out = {}
    for form in ("keep", "replay"):
      (_, rest_g), gramian = osgd_jax.staged_value_and_gramian(
        graphdef, _ce, form=form
      )(params, rest, x, y)
      assert gramian.form == {"keep": "staged-keep", "replay": "staged"}[form]
      out[form] = (
        rest_g,
        [tx.update(gramian, tx.init(params), params) for tx in txs],
      )
    return rest_s, expected, out

  rest_s, expected, out = run(params, rest, x, y)
  # One forward in train mode updates the statistics once.
  model(x)
  for rest_g, updates in out.values():
    chex.assert_trees_all_close(
      rest_g, nnx.state(model, nnx.Not(nnx.Param)), rtol=1e-6, atol=1e-7
    )
    chex.assert_trees_all_close(rest_g, rest_s, rtol=1e-6, atol=1e-7)
    for want, got in zip(expected, updates, strict=True):
      chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
      chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_staged_auto_keeps_rows_where_activations_dominate():
  """Compiled temp bytes: the automatic staged Gramian ≤ the staged stack.

  XLA's memory analysis, deterministic for a given program: with the
  batch's activations above K × the parameters' bytes, "auto" keeps the
  rows of one staged backward (form "staged-keep") and holds no more than
  the staged stacked path, which holds the same rows padded to K.
  """
  model = zoo.create("nested-depth-mlp", rngs=nnx.Rngs(0), width=8, stages=K)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x, y = jnp.ones((512, 64)), jnp.zeros(512, jnp.int32)
  tx = osgd_jax.osgd(num_exits=K)
  forms = []

  def stacked(p, r, x, y):
    _, g = osgd_jax.staged_value_and_per_exit_grads(graphdef, _ce)(p, r, x, y)
    return optax.apply_updates(p, tx.update(g, tx.init(p), p)[0])

  def gramian(p, r, x, y):
    _, g = osgd_jax.staged_value_and_gramian(graphdef, _ce)(p, r, x, y)
    forms.append(g.form)
    return optax.apply_updates(p, tx.update(g, tx.init(p), p)[0])

  args = (params, rest, x, y)
  assert _temp_bytes(gramian, *args) <= _temp_bytes(stacked, *args)
  assert forms == ["staged-keep"]
  with pytest.raises(ValueError, match="form must be one of"):
    osgd_jax.staged_value_and_gramian(graphdef, _ce, form="scan")


def test_auto_keeps_rows_where_activations_dominate():
  """Compiled temp bytes: a function's automatic Gramian ≤ its stack.

  With the batch's activations above K × the parameters' bytes, "auto"
  takes "vmap", which keeps the rows of one backward pass and frees the
  forward's residuals; "blocks" and "scan" keep them for one more
  backward pass, and hold more than the stacked path.
  """
  params, _ = _setup(np.float32)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4096, 5)), jnp.float32)
  tx = osgd_jax.osgd(num_exits=K)
  forms = []

  def step(form):
    def run(p, x):
      if form == "stacked":
        _, g = osgd_jax.value_and_per_exit_grads(_loss_fn)(p, x)
      else:
        _, g = osgd_jax.value_and_gramian(_loss_fn, form=form)(p, x)
        forms.append(g.form)
      return optax.apply_updates(p, tx.update(g, tx.init(p), p)[0])

    return _temp_bytes(run, params, x)

  stacked, auto = step("stacked"), step("auto")
  assert forms == ["vmap"]
  assert auto <= stacked < min(step("blocks"), step("scan"))


def test_auto_takes_blocks_where_its_exit_rows_fit_in_the_parameters():
  """Compiled temp bytes: "auto" is the leanest form of an early-exit MLP.

  The parameters dominate (K·P ≥ the residuals), and the layers' output
  cotangents, each held for the exits that reach it (layer j for exits
  j..K), fit in one copy of the parameters: "auto" takes "blocks", which
  holds less than "scan" and "vmap". Budgeting K cotangents of every
  residual instead sent such networks to "scan".
  """
  rng = np.random.default_rng(3)
  params = [
    jnp.asarray(rng.normal(size=(64, 64)) / 8, jnp.float32) for _ in range(K)
  ]
  x = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)

  def loss_fn(ps, x):
    h, out = x, []
    for w in ps:
      h = jnp.tanh(h @ w)
      out.append(jnp.mean(h**2))
    return jnp.stack(out)

  tx = osgd_jax.osgd(num_exits=K)
  forms = []

  def temp(form):
    def run(p, x):
      _, g = osgd_jax.value_and_gramian(loss_fn, form=form)(p, x)
      forms.append(g.form)
      return optax.apply_updates(p, tx.update(g, tx.init(p), p)[0])

    return _temp_bytes(run, params, x)

  auto = temp("auto")
  assert forms[0] == "blocks"
  assert auto < min(temp("scan"), temp("vmap"))


def test_staged_keep_scales_and_sums_each_leaf_from_its_own_rows():
  """Each leaf's update reads its own rows and the weights, nothing else.

  Exponents taken from every leaf at once made each leaf's scaled copy and
  weighted sum wait for every leaf's rows, and put the automatic staged
  Gramian above the staged stacked path on zoo ResNets
  (benchmarks/RESULTS.md, 2026-12-07, "the staged Gramian's exponents").
  """
  _, graphdef, params, rest, x, y = _bn_model()
  _, gramian = osgd_jax.staged_value_and_gramian(graphdef, _ce, form="keep")(
    params, rest, x, y
  )
  rows = gramian.parts
  weights = jnp.ones((1, K), jnp.float32)

  def combine(rows, weights):
    return gramian.engine.combine(rows, gramian, weights, "global")

  closed = jax.make_jaxpr(combine)(rows, weights)
  assert len(rows) == len(closed.jaxpr.outvars) > 1
  for i, out in enumerate(closed.jaxpr.outvars):
    assert inputs_reached(closed.jaxpr, out) == {i, len(rows)}


def test_refusals_name_the_fix():
  params, x = _setup(np.float32)
  _, gramian = osgd_jax.value_and_gramian(_loss_fn)(params, x)
  tx = osgd_jax.osgd(num_exits=K, method="sequential")
  with pytest.raises(ValueError, match="use method='gram'"):
    tx.update(gramian, tx.init(params), params)
  tx = osgd_jax.osgd(num_exits=K + 1)
  with pytest.raises(ValueError, match=f"build it with num_exits={K}"):
    tx.update(gramian, tx.init(params), params)
  tx = osgd_jax.osgd(num_exits=K)
  with pytest.raises(ValueError, match="different tree structures"):
    tx.update(gramian, tx.init({"b": params["b"]}), {"b": params["b"]})
  wrong = {"a": {"w": jnp.zeros((4, 5))}, "b": params["b"]}
  with pytest.raises(ValueError, match=r"has shape \(5, 4\)"):
    tx.update(gramian, tx.init(params), wrong)
  with pytest.raises(ValueError, match="form must be one of"):
    osgd_jax.value_and_gramian(_loss_fn, form="jvp")
  with pytest.raises(ValueError, match="granularity must be one of"):
    gramian.grams("layer")
  with pytest.raises(ValueError, match="must return a 1-D vector"):
    osgd_jax.value_and_gramian(lambda p, x: _loss_fn(p, x).sum())(params, x)


def test_optax_contract_with_a_gramian():
  """Chains, inject_hyperparams, lax.scan and Orbax as with the stack."""
  params, x = _setup(np.float32)
  xs = jnp.stack([x, 2.0 * x, -x])

  def steps(tx, engine):
    def step(carry, xb):
      p, state = carry
      if engine == "gramian":
        _, grads = osgd_jax.value_and_gramian(_loss_fn)(p, xb)
      else:
        _, grads = osgd_jax.value_and_per_exit_grads(_loss_fn)(p, xb)
      updates, state = tx.update(grads, state, p)
      return (optax.apply_updates(p, updates), state), None

    (p, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, xs))(
      (params, tx.init(params))
    )
    return p, state

  for tx in (
    optax.chain(
      osgd_jax.osgd(num_exits=K),
      optax.add_decayed_weights(1e-3),
      optax.sgd(0.1, momentum=0.9),
    ),
    optax.inject_hyperparams(osgd_jax.osgd_sgd, static_args=("num_exits",))(
      learning_rate=0.1, num_exits=K, sgd_after=2
    ),
  ):
    expected = steps(tx, "stacked")
    got = steps(tx, "gramian")
    chex.assert_trees_all_equal_shapes_and_dtypes(got, expected)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
  state = got[1]
  with (
    tempfile.TemporaryDirectory() as directory,
    ocp.StandardCheckpointer() as checkpointer,
  ):
    path = os.path.join(directory, "state")
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(path, tx.init(params))
  chex.assert_trees_all_equal(restored, state)


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_memory_is_bounded_by_the_parameters_not_k():
  """Parameter-dominated: within plain + P (global), + 2P (leaf), any K.

  Both lean forms: ``"blocks"`` (the automatic choice: every parameter
  is a matrix-product operand) and ``"scan"``. XLA's compiled memory
  analysis, deterministic for a given program; the stacked step needs K
  copies of the parameters. ``scan`` does not grow with K; ``blocks`` grows
  by no more than the K cotangents of the activations (fewer on an
  early-exit network: ``tests/test_exit_pullback.py``)
  (``docs/design.md``, "The Gramian engine"), a small fraction of one copy
  of the parameters.
  """
  width, batch = 256, 2
  rng = np.random.default_rng(0)
  params = [
    jnp.asarray(rng.normal(size=(width, width)) / 16, jnp.float32)
    for _ in range(4)
  ]
  param_bytes = 4 * width * width * len(params)
  x = jnp.ones((batch, width))

  def make(k):
    def loss_fn(ps, x):
      h, out = x, []
      for w in ps:
        h = jnp.tanh(h @ w)
        out.append(jnp.mean(h**2))
      return jnp.stack([out[i % 4] * (1 + i) for i in range(k)])

    return loss_fn

  def plain(ps, x):
    grads = jax.grad(lambda ps: make(4)(ps, x).sum())(ps)
    return jax.tree.map(lambda p, g: p - g, ps, grads)

  plain_bytes = _temp_bytes(plain, params, x)
  temps = {}
  for form, chosen in (("auto", "blocks"), ("scan", "scan")):
    for k in (4, 8):
      for granularity in ("global", "leaf"):
        tx = osgd_jax.osgd(num_exits=k, granularity=granularity)

        def step(ps, x, tx=tx, k=k, form=form, chosen=chosen):
          _, gramian = osgd_jax.value_and_gramian(make(k), form=form)(ps, x)
          assert gramian.form == chosen
          updates, _ = tx.update(gramian, tx.init(ps), ps)
          return optax.apply_updates(ps, updates)

        temps[form, k, granularity] = _temp_bytes(step, params, x)

  def stacked(ps, x):
    _, grads = osgd_jax.value_and_per_exit_grads(make(4))(ps, x)
    tx = osgd_jax.osgd(num_exits=4, granularity="global")
    return optax.apply_updates(ps, tx.update(grads, tx.init(ps), ps)[0])

  assert _temp_bytes(stacked, params, x) >= plain_bytes + 3 * param_bytes
  for form in ("auto", "scan"):
    for k in (4, 8):
      assert temps[form, k, "global"] <= plain_bytes + param_bytes, temps
      assert temps[form, k, "leaf"] <= plain_bytes + 2 * param_bytes, temps
  # Four more exits' cotangents of every layer's output, in float32.
  cotangent_bytes = (8 - 4) * batch * width * len(params) * 4
  assert cotangent_bytes < param_bytes / 30
  for granularity in ("global", "leaf"):
    four, eight = temps["scan", 4, granularity], temps["scan", 8, granularity]
    assert eight <= 1.1 * four, temps
    four, eight = temps["auto", 4, granularity], temps["auto", 8, granularity]
    assert eight <= four + cotangent_bytes, temps


def _collectives(hlo):
  pattern = re.compile(
    r"^\s*\S+ = (.*?) (all-gather|all-reduce|all-to-all|collective-permute"
    r"|reduce-scatter)(?:-start)?\(",
    re.MULTILINE,
  )
  return [(m.group(2), m.group(1)) for m in pattern.finditer(hlo)]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
@pytest.mark.parametrize("form", ["vmap", "scan", "blocks"])
def test_sharded_gramian_step_equals_unsharded(form, axis_type):
  """Data axis 4 × model axis 2: global-batch Gram, no K×P all-gather.

  Under ``Explicit`` axes every contraction over a sharded axis must say
  its output's sharding (the loss's own, and the engine's Gram blocks).
  """
  explicit = axis_type == "Explicit"
  mesh = jax.make_mesh(
    (4, 2), ("data", "model"), axis_types=(getattr(AxisType, axis_type),) * 2
  )
  rng = np.random.default_rng(4)
  params = {
    "w1": jnp.asarray(rng.normal(size=(8, 16)) / 3, jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(16, 6)) / 4, jnp.float32),
  }
  batch = 20  # a size no parameter axis has: activations are told apart
  x = jnp.asarray(rng.normal(size=(batch, 8)), jnp.float32)

  def loss_fn(p, x, sharded):
    h = jnp.tanh(x @ p["w1"])
    # The contraction over the model axis: its output stays split on data.
    where = NamedSharding(mesh, P("data", None)) if sharded else None
    out = jnp.matmul(h, p["w2"], out_sharding=where)
    return jnp.stack([jnp.mean(h**2), jnp.mean(out**2), jnp.mean(out[:, :2])])

  txs = [osgd_jax.osgd(num_exits=K, granularity=g) for g in ("global", "leaf")]

  def step(p, x, sharded=False):
    _, gramian = osgd_jax.value_and_gramian(
      functools.partial(loss_fn, sharded=sharded and explicit), form=form
    )(p, x)
    return [tx.update(gramian, tx.init(p), p) for tx in txs]

  expected = jax.jit(step)(params, x)
  s_params = {
    "w1": jax.device_put(params["w1"], NamedSharding(mesh, P(None, "model"))),
    "w2": jax.device_put(params["w2"], NamedSharding(mesh, P("model", None))),
  }
  s_x = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  compiled = (
    jax.jit(step, static_argnums=2).lower(s_params, s_x, True).compile()
  )
  got = compiled(s_params, s_x)
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
  for update, _ in got:
    for name in params:
      assert update[name].sharding.is_equivalent_to(s_params[name].sharding, 2)
  # Gathered: nothing of the size of a leaf's K rows, except, for the
  # blocks' N×N kernels, the layer inputs or output cotangents of the
  # global batch (the cross-device terms need them; an axis of size batch).
  smallest_stack = K * min(p.size for p in params.values())
  for op, shape in _collectives(compiled.as_text()):
    if op == "all-gather":
      for dims in re.findall(r"\[([\d,]*)\]", shape):
        sizes = [int(d) for d in dims.split(",") if d]
        if form == "blocks" and batch in sizes:
          continue
        assert int(np.prod(sizes or [1])) < smallest_stack, shape


@pytest.mark.parametrize("form", ["vmap", "scan", "blocks"])
def test_export_for_every_platform(form):
  """Each formulation's step exports for cpu, cuda and tpu from this host."""
  params, x = _setup(np.float32)
  tx = osgd_jax.osgd(num_exits=K)

  def step(p, x):
    _, gramian = osgd_jax.value_and_gramian(_loss_fn, form=form)(p, x)
    return tx.update(gramian, tx.init(p), p)[0]

  jitted = jax.jit(step)
  exported = jax.export.export(jitted, platforms=("cpu", "cuda", "tpu"))(
    params, x
  )
  assert exported.platforms == ("cpu", "cuda", "tpu")
  chex.assert_trees_all_close(
    exported.call(params, x), jitted(params, x), rtol=1e-6, atol=1e-6
  )
