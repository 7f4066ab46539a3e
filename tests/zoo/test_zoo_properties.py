"""Every zoo name through one compiled probe: nesting, the staged Jacobian
and forward mode.

* Nesting: exit k depends only on what stages 1..k introduce. A perturbed
  copy of a model reuses the probe's compiled program, so the exits that
  must not move are compared bit for bit.
* The staged (anytime) Jacobian equals the vmapped VJP, with its exact
  zeros where an exit does not reach a stage or weighs 0.
* ``jax.jvp`` works and agrees with ``jax.vjp`` (the dot-product test).

XLA:CPU compiles slowly, and compiling dominates these tests: every check
of a name reads one program, compiled once per name (``make_probe``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_anytime import WEIGHTS, like, perturb, tiny_batch, tiny_setup
from vmapped_grads import value_and_vmapped_grads

import osgd_jax
from osgd_jax import zoo
from osgd_jax.losses import per_exit_cross_entropy

TINY = dict(stages=3, width=4, depth=1, norm="batch")
# XLA:CPU's optimisation passes dominate the compile time of these tiny
# programs; every comparison below is within one compiled program.
jit = functools.partial(
  jax.jit, compiler_options={"xla_backend_optimization_level": 0}
)
# One family runs in float64, where the staged and vmapped Jacobians must
# agree to double precision; the others in float32.
FLOAT64 = {"branched-mlp"}
# Each family drives a stage's rows one way; each way meets conv, dense and
# transformer families, nested and branched ones.
FAMILY_ROWS = {
  "branched-mlp": "batched",
  "branched-resnet": "looped",
  "nested-depth-mlp": "looped",
  "nested-depth-resnet": "batched",
  "nested-width-mlp": "batched",
  "nested-width-resnet": "looped",
  "nested-width-depth-mlp": "looped",
  "nested-width-depth-resnet": "batched",
  "branched-conv1d": "looped",
  "nested-depth-conv1d": "batched",
  "nested-width-conv1d": "looped",
  "nested-width-depth-conv1d": "batched",
  "branched-transformer": "batched",
  "nested-depth-transformer": "looped",
  "nested-width-transformer": "batched",
  "nested-width-depth-transformer": "looped",
}


def build(
  name: str, **overrides: Any
) -> tuple[zoo.AnytimeNet, np.ndarray, np.ndarray]:
  preset, config = tiny_setup(name, **dict(TINY, **overrides))
  model = zoo.create(name, rngs=nnx.Rngs(0), preset=preset, **config)
  x, labels = tiny_batch(name, preset, config, 4)
  return model, x, labels


def exit_losses(logits: jax.Array, labels: jax.Array) -> tuple[Any, Any]:
  """Weighted cross-entropy; exit 3 also reads exit 1's logits (allowed).

  Exit 2 weighs 0: its gradient rows must be exactly zero.
  """
  losses = per_exit_cross_entropy(logits, labels, jnp.asarray(WEIGHTS))
  losses = losses.at[2].add(0.1 * jnp.mean(logits[0] ** 2))
  return losses, {"sum": losses.sum()}


def numpy_exit_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """``exit_losses`` in float64 NumPy."""
  logits = np.float64(logits)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  picked = np.take_along_axis(log_p, labels[None, ..., None], axis=-1)
  losses = -picked.reshape(len(logits), -1).mean(axis=1) * np.array(WEIGHTS)
  losses[2] += 0.1 * np.mean(logits[0] ** 2)
  return losses


def tokens(x: np.ndarray) -> bool:
  """Token ids are not differentiable: only the parameters get tangents."""
  return x.dtype == np.int32


def tree_vdot(a: Any, b: Any) -> float:
  return sum(
    np.vdot(np.float64(x), np.float64(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def tree_norm(a: Any) -> float:
  return np.sqrt(tree_vdot(a, a))


def has_batchnorm(model: nnx.Module) -> bool:
  return bool(jax.tree.leaves(nnx.state(model, nnx.BatchStat)))


def first_layer(stage: nnx.Module) -> nnx.Module:
  """The first map of a stage's first layer (a whole transformer block)."""
  layer = stage.layers[0]
  inputs = getattr(layer, "inputs", None)
  return inputs[0] if inputs else layer


def jitted_forward(model: nnx.Module) -> Callable[..., jax.Array]:
  """``forward(model, x)``, compiled once for every model of this structure."""
  graphdef, _ = nnx.split(model)
  fn = jit(lambda state, x: nnx.merge(graphdef, state, copy=True)(x))
  return lambda m, x: fn(nnx.split(m)[1], x)


@dataclasses.dataclass
class Case:
  name: str
  model: zoo.AnytimeNet
  x: np.ndarray
  labels: np.ndarray
  params: Any  # of the unperturbed model (float64 where FLOAT64)
  rest: Any
  tangents: tuple[Any, Any, Any]  # t_params, t_x (None for tokens), v
  probe: Callable[..., dict[str, Any]]  # jitted, see `make_probe`
  out: dict[str, Any]  # probe of the unperturbed model

  def forward(self, model: nnx.Module) -> np.ndarray:
    """The probe's full forward of ``model`` (a perturbed copy)."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = cast(self.params, params), cast(self.rest, rest)
    with jax.enable_x64(self.name in FLOAT64):
      out = self.probe(params, rest, self.x, self.labels, *self.tangents)
      return np.asarray(out["full"])


def cast(like_tree: Any, tree: Any) -> Any:
  """``tree``'s leaves as NumPy arrays of ``like_tree``'s dtypes."""
  return jax.tree.map(
    lambda a, b: np.asarray(b, np.asarray(a).dtype), like_tree, tree
  )


def make_probe(model: zoo.AnytimeNet, rows: str) -> Callable[..., Any]:
  """One compiled program per model for every check of this file.

  The full forward, every ``upto``, the stages driven by hand, the vmapped
  and the staged per-exit Jacobians, and forward and reverse mode share one
  ``jax.jit``. The ``upto`` and by-hand passes use the running averages
  (``predict``): the ``upto`` logic does not depend on the BatchNorm mode,
  and tracing BatchNorm's statistic updates is slow in flax 0.12.
  """
  graphdef, _, _ = nnx.split(model, nnx.Param, ...)
  num_exits = model.num_exits

  def losses_and_state(params, rest, x, labels):
    # The vmap path, with the loss function as train.py's step writes it.
    model = nnx.merge(graphdef, params, rest, copy=True)
    losses, aux = exit_losses(model(x), labels)
    return losses, (aux, nnx.state(model, nnx.Not(nnx.Param)))

  vmapped = value_and_vmapped_grads(losses_and_state)
  staged = osgd_jax.staged_value_and_per_exit_grads(
    graphdef, exit_losses, has_aux=True, rows=rows
  )

  def logits(params, rest, x):
    return nnx.merge(graphdef, params, rest, copy=True)(x)

  def forward_and_reverse(params, rest, x, t_params, t_x, v):
    """``(J t, Jᵀ v)`` for the parameters, and for the input unless ids."""
    _, jt_params = jax.jvp(lambda p: logits(p, rest, x), (params,), (t_params,))
    if t_x is None:
      _, vjp = jax.vjp(lambda p: logits(p, rest, x), params)
      return (jt_params, vjp(v)[0]), None
    _, jt_x = jax.jvp(lambda x: logits(params, rest, x), (x,), (t_x,))
    # One reverse pass gives both cotangents (as two jax.vjp calls would,
    # each with the other argument held fixed).
    _, vjp = jax.vjp(lambda p, x: logits(p, rest, x), params, x)
    vt_params, vt_x = vjp(v)
    return (jt_params, vt_params), (jt_x, vt_x)

  @jit
  def probe(params, rest, x, labels, t_params, t_x, v):
    def fresh():
      return nnx.merge(graphdef, params, rest, copy=True)

    (losses, (aux, new_rest)), grads = vmapped(params, rest, x, labels)
    by_hand, frozen = (
      [],
      nnx.view(fresh(), use_running_average=True, raise_if_not_found=False),
    )
    carry = frozen.input_carry(x)
    for stage in frozen.stages:
      carry, out = stage(carry)
      by_hand.append(out)
    return dict(
      full=fresh()(x),
      losses=losses,
      aux=aux,
      new_rest=new_rest,
      grads=grads,
      staged=staged(params, rest, x, labels),
      dot=forward_and_reverse(params, rest, x, t_params, t_x, v),
      eval_full=fresh().predict(x),
      eval_upto=[fresh().predict(x, upto=k) for k in range(1, num_exits + 1)],
      eval_by_hand=jnp.stack(by_hand),
      carry=carry,
    )

  return probe


@pytest.fixture(scope="module", params=zoo.names())
def case(request) -> Case:
  name = request.param
  with jax.enable_x64(name in FLOAT64):
    model, x, labels = build(name)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    # NumPy copies: slicing jax arrays eagerly compiles one XLA program per
    # shape.
    dtype = np.float64 if name in FLOAT64 else np.float32
    params, rest = jax.tree.map(lambda a: np.asarray(a, dtype), (params, rest))
    if not tokens(x):
      x = np.asarray(x, dtype)
    out_shape = (model.num_exits, *labels.shape, model.num_classes)
    tangents = (
      like(params, 2),
      None if tokens(x) else like(x, 3),
      like(np.zeros(out_shape, dtype), 4),
    )
    probe = make_probe(model, FAMILY_ROWS[name])
    out = jax.tree.map(np.asarray, probe(params, rest, x, labels, *tangents))
  return Case(name, model, x, labels, params, rest, tangents, probe, out)


def test_later_stages_do_not_change_earlier_exits(case):
  full = case.out["full"]
  for k in range(1, case.model.num_exits):
    other = nnx.clone(case.model)
    for j, stage in enumerate(other.stages[k:]):
      perturb(stage, 100 * k + j)
    out = case.forward(other)
    np.testing.assert_array_equal(
      out[:k], full[:k], err_msg=f"{case.name}: exits 1..{k} moved"
    )
    # The perturbation is real: the exits that own the parameters move.
    assert not np.allclose(out[k:], full[k:]), (case.name, k)


@pytest.mark.parametrize("target", ["stage", "first_layer", "head"])
def test_a_stage_parameter_changes_its_exit(case, target):
  full = case.out["full"]
  for k in range(1, case.model.num_exits + 1):
    other = nnx.clone(case.model)
    stage = other.stages[k - 1]
    module = {
      "stage": stage,
      "head": stage.head,
      "first_layer": first_layer(stage),
    }[target]
    perturb(module, k)
    out = case.forward(other)
    np.testing.assert_array_equal(out[: k - 1], full[: k - 1])
    assert not np.allclose(out[k - 1], full[k - 1]), (case.name, k)


def test_upto_and_hand_driven_stages_equal_the_full_forward(case):
  full, batch = case.out["eval_full"], case.x.shape[0]
  # One logit vector per example, or per position (causal transformers).
  shape = (batch, *case.labels.shape[1:], case.model.num_classes)
  assert full.shape == case.out["full"].shape == (case.model.num_exits, *shape)
  # Running versus batch statistics (the same without BatchNorm).
  bn = has_batchnorm(case.model)
  assert np.allclose(full, case.out["full"]) == (not bn)
  # The carry is a plain pytree of batched arrays, but for the parameters
  # that MatFormer stages and a shared head pass on (a batch-free entry).
  carry = case.out["carry"]
  weights = ("groups", "shared", "head")
  if isinstance(carry, dict):
    carry = {k: v for k, v in carry.items() if k not in weights}
  leaves = jax.tree.leaves(carry)
  assert leaves and all(a.shape[0] == batch for a in leaves)
  if case.name == "nested-width-transformer":
    assert case.out["carry"].keys() == {"embedded", "shared", "groups"}
  for k, out in enumerate(case.out["eval_upto"], start=1):
    assert out.shape == (k, *shape)
    np.testing.assert_array_equal(out, full[:k], err_msg=f"upto={k}")
  np.testing.assert_array_equal(case.out["eval_by_hand"], full)


def test_per_exit_grads_with_batchnorm_in_train_mode(case):
  model, out, num_exits = case.model, case.out, case.model.num_exits
  losses, grads = out["losses"], out["grads"]
  assert losses.shape == (num_exits,) and np.all(np.isfinite(losses))
  np.testing.assert_allclose(
    losses, numpy_exit_losses(out["full"], case.labels), rtol=1e-5
  )
  np.testing.assert_allclose(out["aux"]["sum"], losses.sum(), rtol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(case.params)
  for g, p in zip(
    jax.tree.leaves(grads), jax.tree.leaves(case.params), strict=True
  ):
    assert g.shape == (num_exits, *p.shape) and g.dtype == p.dtype
  # Structure of the Jacobian: exit k+1 never reaches a later stage's
  # parameters, and reaches every parameter of its own stage (unless its
  # loss weighs 0: then its rows are exact zeros).
  for k in range(num_exits):
    for leaf in jax.tree.leaves(grads["stages"][k]):
      assert not np.any(leaf[:k]), (case.name, k)
      assert np.any(leaf[k]) == (WEIGHTS[k] != 0), (case.name, k)
  # Train-mode BatchNorm statistics come back as aux, and nnx.update stores
  # them in the model (the transformers have LayerNorm only).
  new_stats = jax.tree.leaves(nnx.state(out["new_rest"], nnx.BatchStat))
  old_stats = jax.tree.leaves(nnx.state(case.rest, nnx.BatchStat))
  assert len(new_stats) == len(old_stats)
  assert bool(new_stats) == (not case.name.endswith("transformer"))
  assert all(
    not np.allclose(a, b) for a, b in zip(new_stats, old_stats, strict=True)
  )
  other = nnx.clone(model)
  nnx.update(other, out["new_rest"])
  for a, b in zip(
    jax.tree.leaves(nnx.state(other, nnx.BatchStat)), new_stats, strict=True
  ):  # nnx.update copied the NumPy stats in
    np.testing.assert_array_equal(a, b)


def test_staged_equals_vmap_on_every_family(case):
  out = case.out
  (losses, aux, new_rest), grads = out["staged"]
  x64 = case.name in FLOAT64
  rtol, atol = (1e-10, 1e-12) if x64 else (1e-4, 1e-5)
  np.testing.assert_allclose(losses, out["losses"], rtol=rtol)
  np.testing.assert_allclose(aux["sum"], out["aux"]["sum"], rtol=rtol)
  # BatchNorm ran in train mode in both, with the same statistics.
  assert jax.tree.structure(new_rest) == jax.tree.structure(out["new_rest"])
  for a, b in zip(
    jax.tree.leaves(new_rest), jax.tree.leaves(out["new_rest"]), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)

  reference = out["grads"]
  assert jax.tree.structure(grads) == jax.tree.structure(reference)
  scale = max(np.abs(g).max() for g in jax.tree.leaves(reference))
  for (path, g), r in zip(
    jax.tree_util.tree_flatten_with_path(grads)[0],
    jax.tree.leaves(reference),
    strict=True,
  ):
    assert g.shape == r.shape and g.dtype == r.dtype, path
    np.testing.assert_allclose(
      g, r, rtol=rtol, atol=atol * scale, err_msg=jax.tree_util.keystr(path)
    )
  for stage in range(3):
    rows = jax.tree.leaves(grads["stages"][stage])
    for exit_ in range(3):
      reaches = exit_ >= stage and WEIGHTS[exit_] != 0
      nonzero = any(np.any(leaf[exit_] != 0) for leaf in rows)
      # Exits that do not reach a stage (or weigh 0) give exact zeros.
      assert nonzero == reaches, (case.name, stage, exit_)


def test_jvp_agrees_with_vjp(case):
  """The dot-product test ``<v, J t> == <Jᵀ v, t>``, for the parameters and
  for the input, with ``J t`` from ``jax.jvp`` and ``Jᵀ v`` from
  ``jax.vjp``."""
  t_params, t_x, v = case.tangents
  by_params, by_x = case.out["dot"]
  pairs = [(*by_params, t_params)] + ([] if by_x is None else [(*by_x, t_x)])
  assert len(pairs) == (1 if tokens(case.x) else 2)
  for jt, vt, t in pairs:
    # Every exit moves in the direction t (forward mode reached it).
    assert np.all(np.abs(jt).reshape(len(jt), -1).max(axis=1) > 0)
    # Rounding, relative to the Cauchy-Schwarz bound of both sides.
    bound = max(np.linalg.norm(v) * tree_norm(jt), tree_norm(vt) * tree_norm(t))
    tol = 1e-13 if case.name in FLOAT64 else 1e-6
    assert abs(tree_vdot(v, jt) - tree_vdot(vt, t)) <= tol * bound, case.name


@pytest.mark.parametrize(
  "name,norm",
  [
    ("nested-width-resnet", "group"),
    ("nested-width-mlp", "layer"),
    ("nested-depth-resnet", "none"),
  ],
)
def test_nesting_holds_for_other_norms(name, norm):
  # Width nesting is where a norm could leak: it must act per channel group.
  # ResNets get two blocks per stage here, so that one halves the resolution.
  depth = dict(depth=2) if name.endswith("resnet") else {}
  model, x, _ = build(name, norm=norm, **depth)
  forward = jitted_forward(model)
  full = forward(model, x)
  for k in range(1, model.num_exits):
    other = nnx.clone(model)
    for stage in other.stages[k:]:
      perturb(stage, k)
    out = forward(other, x)
    np.testing.assert_array_equal(out[:k], full[:k])
    assert not np.allclose(out[k:], full[k:])


@pytest.mark.parametrize("name", ["nested-width-resnet"])
def test_stage_vjp_through_the_carry(name):
  """The staged per-exit gradient keeps each stage's VJP: check it works."""
  model, x, _ = build(name)
  graphdef_1, state_1 = nnx.split(model.stages[0])
  graphdef_2, state_2 = nnx.split(model.stages[1])

  @jit
  def run(state_1, state_2, x):
    carry, _ = nnx.merge(graphdef_1, state_1, copy=True)(model.input_carry(x))

    def stage_2(s, c):
      return nnx.merge(graphdef_2, s, copy=True)(c)

    (new_carry, logits), vjp = jax.vjp(stage_2, state_2, carry)
    return carry, vjp(
      (jax.tree.map(jnp.zeros_like, new_carry), jnp.ones_like(logits))
    )

  carry, (d_state, d_carry) = run(state_1, state_2, x)
  assert jax.tree.structure(d_carry) == jax.tree.structure(carry)
  # Exit 2 depends on stage 2's parameters and on stage 1 through the carry.
  assert any(np.any(g) for g in jax.tree.leaves(nnx.state(d_state, nnx.Param)))
  assert any(np.any(g) for g in jax.tree.leaves(d_carry))
