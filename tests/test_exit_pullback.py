"""The K one-hot pullbacks held for the exits that reach each value.

``one_hot_pullbacks`` must equal ``jax.vmap(vjp_fn)(jnp.eye(K))`` (JAX's
own batching, an independent implementation) on every kind of loss, and a
float64 NumPy backpropagation of an early-exit network; and
``one_hot_pullback_rows`` must hold each value for exactly the exits that
reach it: a head's parameters and output for its own exit only, a trunk
layer for the exits whose heads read it or a layer above it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_anytime import compile_cheaply, tiny_net
from vmapped_grads import value_and_vmapped_grads

import osgd_jax
from osgd_jax.exit_pullback import (
  ExitRows,
  one_hot_pullback_rows,
  one_hot_pullbacks,
)


def _rows(tree):
  return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, ExitRows))


def _assert_matches_vmap(losses_fn, *args, rtol=1e-12):
  """Checks the pullback against ``jax.vmap``.

  Both are computed in one cheaply compiled program. Returns the exit
  rows as traced (their exits are static; their values are tracers) and
  the K rows of every leaf.
  """
  rows = []

  def both(*args):
    losses, vjp_fn = jax.vjp(losses_fn, *args)
    k, dtype = losses.shape[0], losses.dtype
    rows.append(one_hot_pullback_rows(vjp_fn, k, dtype))
    expected = jax.vmap(vjp_fn)(jnp.eye(k, dtype=dtype))
    return expected, one_hot_pullbacks(vjp_fn, k, dtype)

  expected, got = compile_cheaply(both, *args)(*args)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
    assert g.shape == e.shape and g.dtype == e.dtype
    np.testing.assert_allclose(g, e, rtol=rtol, atol=rtol)
  return rows[0], got


def _exit_network(params, x, y, reads, loss):
  """A tanh trunk with one linear head per exit, exit k reading ``reads[k]``."""
  h, hidden = x, []
  for w in params["layers"]:
    h = jnp.tanh(h @ w)
    hidden.append(h)
  logits = [hidden[r] @ v for r, v in zip(reads, params["heads"], strict=True)]
  if loss == "cross-entropy":  # stacked logits: the exit axis is an axis
    return osgd_jax.per_exit_cross_entropy(jnp.stack(logits), y)
  if loss == "weighted":
    weights = jnp.arange(1.0, len(reads) + 1.0)
    return osgd_jax.per_exit_cross_entropy(jnp.stack(logits), y, weights)
  if loss == "jitted":  # each exit's loss in a nested jit
    square = jax.jit(lambda z: jnp.mean(z**2))
    return jnp.stack([square(z) for z in logits])
  return jnp.stack([jnp.mean(z**2) for z in logits])  # stacked scalars


def _network_params(rng, widths, num_exits, classes):
  layers = [
    rng.normal(size=(a, b)) / math.sqrt(a)
    for a, b in zip(widths[:-1], widths[1:], strict=True)
  ]
  heads = [rng.normal(size=(widths[-1], classes)) for _ in range(num_exits)]
  return {"layers": layers, "heads": heads}


@settings(max_examples=20, deadline=None)
@given(
  reads=st.lists(st.integers(0, 2), min_size=1, max_size=5),
  layers=st.integers(1, 3),
  loss=st.sampled_from(["cross-entropy", "weighted", "jitted", "squares"]),
  dtype=st.sampled_from([np.float64, np.float32]),
  seed=st.integers(0, 2**16),
)
def test_each_value_is_held_for_the_exits_that_reach_it(
  reads, layers, loss, dtype, seed
):
  """Values equal vmap's, in float64 and float32, under ``jax.jit``; each
  leaf holds exactly its exits' rows."""
  reads = [r % layers for r in reads]
  k = len(reads)
  rng = np.random.default_rng(seed)
  with jax.enable_x64(dtype == np.float64):
    params = jax.tree.map(
      lambda a: jnp.asarray(a, dtype),
      _network_params(rng, [4] + [5] * layers, k, 3),
    )
    x = jnp.asarray(rng.normal(size=(6, 4)), dtype)
    y = jnp.asarray(rng.integers(0, 3, size=6))
    rows, full = _assert_matches_vmap(
      lambda p: _exit_network(p, x, y, reads, loss),
      params,
      rtol=1e-12 if dtype == np.float64 else 1e-5,
    )
  (held,), (full,) = rows, full
  for i, head in enumerate(held["heads"]):
    assert head.exits == (i,)
    assert head.value.shape == (1, 5, 3)
  for layer, w in enumerate(held["layers"]):
    # Exits whose head reads this layer or one above it.
    reaching = tuple(i for i, r in enumerate(reads) if r >= layer)
    if reaching:
      assert w.exits == reaching
      assert w.value.shape[0] == len(reaching)
    else:  # read by no exit: its zero pullback, broadcast as vmap does
      assert w.exits == tuple(range(k))
      np.testing.assert_array_equal(full["layers"][layer], 0.0)


def test_matches_a_float64_numpy_backpropagation():
  """Exit k's gradient of ½‖h_{r_k} V_k‖², backpropagated by hand."""
  rng = np.random.default_rng(0)
  reads = [0, 2, 1, 2]
  params = _network_params(rng, [3, 4, 4, 4], len(reads), 2)
  x = rng.normal(size=(5, 3))

  def losses_fn(p):
    h, hidden = jnp.asarray(x), []
    for w in p["layers"]:
      h = jnp.tanh(h @ w)
      hidden.append(h)
    return jnp.stack(
      [
        0.5 * jnp.sum((hidden[r] @ v) ** 2)
        for r, v in zip(reads, p["heads"], strict=True)
      ]
    )

  hidden, h = [], x
  for w in params["layers"]:
    h = np.tanh(h @ w)
    hidden.append(h)
  expected_layers = [
    np.zeros((len(reads),) + w.shape) for w in params["layers"]
  ]
  expected_heads = [np.zeros((len(reads),) + v.shape) for v in params["heads"]]
  for k, (r, v) in enumerate(zip(reads, params["heads"], strict=True)):
    out = hidden[r] @ v
    expected_heads[k][k] = hidden[r].T @ out
    delta = out @ v.T  # ∂ℓ_k/∂h_r
    for layer in range(r, -1, -1):
      pre = delta * (1 - hidden[layer] ** 2)  # through tanh
      below = x if layer == 0 else hidden[layer - 1]
      expected_layers[layer][k] = below.T @ pre
      delta = pre @ params["layers"][layer].T
  with jax.enable_x64(True):
    p = jax.tree.map(jnp.asarray, params)
    _, vjp_fn = jax.vjp(losses_fn, p)
    (got,) = one_hot_pullbacks(vjp_fn, len(reads), jnp.float64)
  for g, e in zip(got["layers"], expected_layers, strict=True):
    np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)
  for g, e in zip(got["heads"], expected_heads, strict=True):
    np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


def _w(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape)


# Losses whose backward passes take each of the interpreter's rules (K = 3).
CASES = {
  # The exit axis kept through a transpose, a reshape, a cumsum and a
  # reduction, then unstacked.
  "transpose-reshape-cumsum": (
    lambda w: jnp.sum(
      jnp.cumsum(
        jnp.transpose(jnp.tanh(jnp.stack([w[:2], w[1:3], w[2:]])), (1, 0, 2))
        .reshape(2, 3, 4)
        .transpose(1, 0, 2),
        axis=2,
      )
      ** 2,
      axis=(1, 2),
    ),
    _w(4, 4),
  ),
  # Per-exit weights contracted with the exit axis as a batch axis.
  "batched-product": (
    lambda w: jnp.sum(
      jnp.einsum("kbd,kdc->kbc", jnp.ones((3, 2, 4)), w) ** 2, axis=(1, 2)
    ),
    _w(3, 4, 5),
  ),
  # The loss vector reordered by slices: exit 0 is v[1], 2 is v[0].
  "reordered-losses": (
    lambda w: (lambda v: jnp.concatenate([v[1:3], v[:1]]))(
      jnp.stack([jnp.sum(w**2), jnp.sum(w**3), jnp.sum(jnp.sin(w))])
    ),
    _w(3, 2),
  ),
  # Every loss mixes every exit's value: the rows of all K.
  "mixed": (
    lambda w: (
      jnp.asarray([[1.0, 2.0], [0.5, 0.0], [3.0, 1.0]])
      @ jnp.stack([jnp.sum(jnp.sin(w)), jnp.sum(w**2)])
    ),
    _w(3, 3),
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_rule_matches_vmap(name):
  fn, w = CASES[name]
  with jax.enable_x64(True):
    _assert_matches_vmap(fn, jnp.asarray(w))


def test_rows_at_exits_apart_are_placed_between_zeros():
  """Exit 1 reads only ``b``: ``a``'s rows are exits 0 and 2, zero-filled."""

  def losses_fn(a, b):
    return jnp.stack([jnp.sum(a**2), jnp.sum(b**2), jnp.sum(a * b)])

  with jax.enable_x64(True):
    a, b = jnp.asarray(_w(3)), jnp.asarray(_w(3, seed=1))
    (of_a, of_b), _ = _assert_matches_vmap(losses_fn, a, b)
    full = one_hot_pullbacks(jax.vjp(losses_fn, a, b)[1], 3, jnp.float64)
  assert of_a.exits == (0, 2) and of_b.exits == (1, 2)
  np.testing.assert_array_equal(full[0][1], np.zeros(3))


def test_a_value_the_cotangent_does_not_reach_is_every_exits():
  """A pullback that returns a constant broadcasts it, as vmap does."""

  def pullback(ct):
    return {"reached": ct * 2.0, "constant": jnp.ones(2)}

  got = one_hot_pullbacks(pullback, 3, jnp.float32)
  np.testing.assert_array_equal(got["constant"], np.ones((3, 2)))
  np.testing.assert_array_equal(got["reached"], 2.0 * np.eye(3))
  assert _rows(one_hot_pullback_rows(pullback, 3, jnp.float32))[0].exits == (
    0,
    1,
    2,
  )


@pytest.mark.parametrize(
  "name",
  ["nested-depth-resnet", "nested-width-transformer", "branched-transformer"],
)
def test_zoo_models_per_exit_grads_equal_jax_vmap(name):
  """BatchNorm in train mode, attention, a MatFormer's weight-sharing
  exits and a causal model's per-position losses: the library's per-exit
  gradients (this pullback) equal JAX's own ``vmap`` of the VJP."""
  model, x, y = tiny_net(name)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def exit_losses(params, rest, x, y):
    model = nnx.merge(graphdef, params, rest, copy=True)
    losses = osgd_jax.per_exit_cross_entropy(model(x), y)
    return losses, nnx.state(model, nnx.Not(nnx.Param))

  ours = osgd_jax.value_and_per_exit_grads(exit_losses, has_aux=True)
  theirs = value_and_vmapped_grads(exit_losses)
  got, expected = compile_cheaply(
    lambda *args: (ours(*args), theirs(*args)), params, rest, x, y
  )(params, rest, x, y)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    assert g.shape == e.shape and g.dtype == e.dtype
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_the_blocks_step_grows_linearly_not_quadratically_in_k():
  """A head's cotangent is one row: from K = 4 to 8, only each layer's
  cotangent gains rows (4 more per layer), not each head's contribution.

  XLA's compiled memory analysis of the ``blocks`` osgd step on an
  early-exit MLP with K linear heads (deterministic for a program). With
  every value held for all K exits (``jax.vmap``), the K heads' K-row
  contributions made the growth several times this bound.
  """
  width, batch, layers, classes, inputs = 512, 16, 4, 10, 256
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, inputs)), jnp.float32)
  y = jnp.arange(batch) % classes

  def step_bytes(k, granularity):
    params = jax.tree.map(
      lambda a: jnp.asarray(a, jnp.float32),
      _network_params(
        np.random.default_rng(1), [inputs] + [width] * layers, k, classes
      ),
    )
    reads = [math.ceil((i + 1) * layers / k) - 1 for i in range(k)]
    tx = osgd_jax.osgd(num_exits=k, granularity=granularity)

    def step(ps):
      fn = lambda p: _exit_network(p, x, y, reads, "cross-entropy")  # noqa: E731
      _, gramian = osgd_jax.value_and_gramian(fn, form="blocks")(ps)
      updates, _ = tx.update(gramian, tx.init(ps), ps)
      return optax.apply_updates(ps, updates)

    compiled = jax.jit(step).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  more_rows = (8 - 4) * batch * width * layers * 4  # float32
  for granularity in ("global", "leaf"):
    four, eight = step_bytes(4, granularity), step_bytes(8, granularity)
    assert eight - four <= more_rows, (granularity, four, eight)
