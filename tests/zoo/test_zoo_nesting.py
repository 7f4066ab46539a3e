"""Nesting: exit k depends only on what stages 1..k introduce.

Every model runs through ``jax.jit`` of a pure function of its state, so a
perturbed copy reuses the compiled program: the exits that must not move are
compared bit for bit.
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
from tiny_anytime import tiny_batch, tiny_setup

import osgd_jax
from osgd_jax import zoo

TINY = dict(stages=3, width=4, depth=1, norm="batch")
# BatchNorm (train mode) in every convolutional and dense family; two MLPs
# without a norm keep the compile time down, and the transformers use
# LayerNorm. Other norms: see `test_nesting_holds_for_other_norms`.
NORM = {"branched-mlp": "none", "nested-depth-mlp": "none"}
# XLA:CPU's optimisation passes dominate the compile time of these tiny
# programs; every comparison below is within one compiled program.
jit = functools.partial(
  jax.jit, compiler_options={"xla_backend_optimization_level": 0}
)


def build(
  name: str, **overrides: Any
) -> tuple[zoo.AnytimeNet, np.ndarray, np.ndarray]:
  preset, config = tiny_setup(name, **dict(TINY, **overrides))
  model = zoo.create(name, rngs=nnx.Rngs(0), preset=preset, **config)
  x, labels = tiny_batch(name, preset, config, 4)
  return model, x, labels


def has_batchnorm(model: nnx.Module) -> bool:
  return bool(jax.tree.leaves(nnx.state(model, nnx.BatchStat)))


def first_layer(stage: nnx.Module) -> nnx.Module:
  """The first map of a stage's first layer (a whole transformer block)."""
  layer = stage.layers[0]
  inputs = getattr(layer, "inputs", None)
  return inputs[0] if inputs else layer


def perturb(module: nnx.Module, seed: int) -> None:
  """Adds unit Gaussian noise to every parameter of ``module`` in place."""
  # NumPy noise: no XLA compilation per parameter shape.
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(nnx.state(module, nnx.Param))
  noisy = [
    jnp.asarray(np.asarray(p) + rng.standard_normal(p.shape), p.dtype)
    for p in leaves
  ]
  nnx.update(module, jax.tree.unflatten(treedef, noisy))


def jitted_forward(model: nnx.Module) -> Callable[..., jax.Array]:
  """``forward(model, x)``, compiled once for every model of this structure."""
  graphdef, _ = nnx.split(model)
  fn = jit(lambda state, x: nnx.merge(graphdef, state, copy=True)(x))
  return lambda m, x: fn(nnx.split(m)[1], x)


@dataclasses.dataclass
class Case:
  name: str
  model: zoo.AnytimeNet
  x: jax.Array
  labels: jax.Array
  probe: Callable[..., dict[str, Any]]  # jitted, see `make_probe`
  out: dict[str, Any]  # probe of the unperturbed model

  def forward(self, model: nnx.Module) -> np.ndarray:
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return np.asarray(self.probe(params, rest, self.x, self.labels)["full"])


def make_probe(model: zoo.AnytimeNet) -> Callable[..., dict[str, Any]]:
  """One compiled program per model for every check of this file.

  XLA:CPU compiles slowly, so the full forward, every ``upto``, the stages
  driven by hand and the per-exit gradients share one ``jax.jit``. The
  ``upto`` and by-hand passes use the running averages (``predict``): the
  ``upto`` logic does not depend on the BatchNorm mode, and tracing
  BatchNorm's statistic updates is slow in flax 0.12.
  """
  graphdef, _, _ = nnx.split(model, nnx.Param, ...)
  num_exits = model.num_exits
  grads_fn = osgd_jax.value_and_per_exit_grads(
    zoo.per_exit_loss_fn(graphdef), has_aux=True
  )

  @jit
  def probe(params, rest, x, labels):
    def fresh():
      return nnx.merge(graphdef, params, rest, copy=True)

    full = fresh()(x)
    (losses, new_rest), grads = grads_fn(params, rest, x, labels)
    by_hand, frozen = (
      [],
      nnx.view(fresh(), use_running_average=True, raise_if_not_found=False),
    )
    carry = frozen.input_carry(x)
    for stage in frozen.stages:
      carry, logits = stage(carry)
      by_hand.append(logits)
    return dict(
      full=full,
      losses=losses,
      new_rest=new_rest,
      grads=grads,
      eval_full=fresh().predict(x),
      eval_upto=[fresh().predict(x, upto=k) for k in range(1, num_exits + 1)],
      eval_by_hand=jnp.stack(by_hand),
      carry=carry,
    )

  return probe


@pytest.fixture(scope="module", params=zoo.names())
def case(request) -> Case:
  model, x, labels = build(request.param, norm=NORM.get(request.param, "batch"))
  probe = make_probe(model)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  # NumPy copies: slicing jax arrays eagerly compiles one XLA program per
  # shape.
  out = jax.tree.map(np.asarray, probe(params, rest, x, labels))
  return Case(request.param, model, x, labels, probe, out)


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
  _, params, rest = nnx.split(model, nnx.Param, ...)
  losses, grads = out["losses"], out["grads"]
  assert losses.shape == (num_exits,) and np.all(np.isfinite(losses))
  np.testing.assert_allclose(
    losses,
    osgd_jax.losses.per_exit_cross_entropy(
      jnp.asarray(out["full"]), case.labels
    ),
    rtol=1e-5,
  )
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
    assert g.shape == (num_exits, *p.shape)
  # Structure of the Jacobian: exit k+1 never reaches a later stage's
  # parameters, and reaches every parameter of its own stage.
  for k in range(num_exits):
    for leaf in jax.tree.leaves(grads["stages"][k]):
      assert not np.any(leaf[:k]), (case.name, k)
      assert np.any(leaf[k]), (case.name, k)
  # Train-mode BatchNorm statistics come back as aux, and nnx.update stores
  # them in the model.
  new_stats = jax.tree.leaves(nnx.state(out["new_rest"], nnx.BatchStat))
  old_stats = jax.tree.leaves(nnx.state(rest, nnx.BatchStat))
  assert len(new_stats) == len(old_stats)
  assert bool(new_stats) == (
    case.name not in NORM and not case.name.endswith("transformer")
  )
  assert all(
    not np.allclose(a, b) for a, b in zip(new_stats, old_stats, strict=True)
  )
  other = nnx.clone(model)
  nnx.update(other, out["new_rest"])
  for a, b in zip(
    jax.tree.leaves(nnx.state(other, nnx.BatchStat)), new_stats, strict=True
  ):  # nnx.update copied the NumPy stats in
    np.testing.assert_array_equal(a, b)


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
