"""What only the transformers have: causal masking, the shared head, and
MatFormer's carried weights, through the staged Jacobian, ``jax.export`` and
a sharded mesh. The zoo's other properties are checked for every name by the
parametrized tests beside this file.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from tiny_anytime import compile_cheaply, perturb, tiny_batch
from vmapped_grads import value_and_vmapped_grads

import osgd_jax
from osgd_jax import sharding, zoo
from osgd_jax.losses import per_exit_cross_entropy

TEXT = dict(
  preset="text", stages=3, width=4, depth=1, heads=2, length=6, vocab=12,
  num_classes=12,
)  # fmt: skip


def text_model(name: str, **config):
  settings = dict(TEXT, **config)
  preset = settings.pop("preset")
  model = zoo.create(name, rngs=nnx.Rngs(0), preset=preset, **settings)
  x, y = tiny_batch(name, preset, settings, 4)
  return model, jnp.asarray(x), jnp.asarray(y)


@pytest.fixture(scope="module")
def shared():
  """A causal byte-level model whose exits share stage 1's head."""
  model, x, y = text_model("nested-depth-transformer", shared_head=True)
  graphdef, _ = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  return model, x, y, lambda m, x: np.asarray(forward(nnx.split(m)[1], x))


def test_the_shared_head_belongs_to_stage_1_and_serves_every_exit(shared):
  model, x, _, forward = shared
  assert isinstance(model.stages[0], zoo.SharedHeadStage)
  assert isinstance(model.stages[0].head, zoo.Head)
  assert all(stage.head is None for stage in model.stages[1:])
  full = forward(model, x)
  assert full.shape == (3, 4, 6, 12)
  # The head is stage 1's: changing it changes every exit.
  other = nnx.clone(model)
  perturb(other.stages[0].head, 1)
  out = forward(other, x)
  assert all(not np.allclose(out[k], full[k]) for k in range(3))
  # And exit k still depends on stages 1..k only.
  for k in (1, 2):
    other = nnx.clone(model)
    for stage in other.stages[k:]:
      perturb(stage, k)
    out = forward(other, x)
    np.testing.assert_array_equal(out[:k], full[:k])
    assert not np.allclose(out[k:], full[k:])


@pytest.mark.parametrize(
  "name", ["branched-transformer", "nested-width-transformer"]
)
def test_causal_positions_never_read_later_tokens(name):
  model, x, _ = text_model(name)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  full = np.asarray(forward(state, x))
  for t in range(x.shape[1]):
    changed = x.at[:, t].set((x[:, t] + 1) % 12)
    out = np.asarray(forward(state, changed))
    np.testing.assert_array_equal(out[:, :, :t], full[:, :, :t], err_msg=t)
    assert not np.allclose(out[:, :, t], full[:, :, t]), t


def _vmapped(graphdef, loss):
  def exit_losses(params, rest, x, y):
    model = nnx.merge(graphdef, params, rest, copy=True)
    return loss(model(x), y), nnx.state(model, nnx.Not(nnx.Param))

  return value_and_vmapped_grads(exit_losses)


_PLATFORMS = ("cpu", "cuda", "tpu")


@pytest.fixture(scope="module")
def shared_grads(shared):
  """The shared-head model's staged gradients, exported for every platform.

  The staged function, its exported form and the vmapped reference are
  compiled as one program (compilation dominates on a CPU), so each
  comparison below is within one program, as when compiled separately.
  """
  model, x, y, _ = shared
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  staged = osgd_jax.staged_value_and_per_exit_grads(
    graphdef, per_exit_cross_entropy
  )
  exported = jax.export.export(jax.jit(staged), platforms=_PLATFORMS)(
    params, rest, x, y
  )
  vmapped = _vmapped(graphdef, per_exit_cross_entropy)
  every = compile_cheaply(
    lambda *args: dict(
      staged=staged(*args),
      vmapped=vmapped(*args),
      exported=exported.call(*args),
    ),
    params,
    rest,
    x,
    y,
  )
  return exported, jax.device_get(every(params, rest, x, y))


def test_staged_jacobian_of_the_shared_head_equals_vmap(shared_grads):
  _, out = shared_grads
  (losses, _), grads = out["staged"]
  (ref_losses, _), ref_grads = out["vmapped"]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for g, r in zip(
    jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True
  ):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
  # Every exit's loss reaches the shared head (stage 1's parameters).
  head = grads["stages"][0]["head"]["linear"]["kernel"]
  assert all(np.any(head[k]) for k in range(3))


def _custom_calls(text: str) -> list[str]:
  return re.findall(r"custom_call\s*@([\w.$-]+)", text)


def test_export_for_cpu_gpu_and_tpu(shared_grads):
  exported, out = shared_grads
  assert exported.platforms == _PLATFORMS
  assert not _custom_calls(exported.mlir_module())
  for a, b in zip(
    jax.tree.leaves(out["exported"]),
    jax.tree.leaves(out["staged"]),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


_COLLECTIVE = re.compile(
  r"^\s*\S+ = (.*?) (all-gather|all-reduce|all-to-all|collective-permute|"
  r"reduce-scatter)(?:-start)?\(",
  re.MULTILINE,
)


@pytest.mark.skipif(jax.device_count() < 8, reason="tests/conftest.py: 8")
def test_matformer_on_a_mesh_shards_its_parameters_on_the_model_axis():
  model, x, y = text_model("nested-width-transformer", width=8)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  mesh = sharding.make_mesh("data=4,model=2")
  s_params = sharding.shard_params(params, mesh)
  specs = [a.sharding.spec for a in jax.tree.leaves(s_params)]
  assert any("model" in str(spec) for spec in specs)
  grads_fn = osgd_jax.staged_value_and_per_exit_grads(
    graphdef, per_exit_cross_entropy
  )
  stacked = sharding.stacked_shardings(sharding.param_shardings(s_params, mesh))
  step = jax.jit(
    lambda p, r, x, y: grads_fn(p, r, x, y)[1], out_shardings=stacked
  )
  grads = step(
    s_params, rest, sharding.shard_batch(x, mesh), sharding.shard_batch(y, mesh)
  )
  _, expected = jax.jit(grads_fn)(params, rest, x, y)
  for g, e, p in zip(
    jax.tree.leaves(grads),
    jax.tree.leaves(expected),
    jax.tree.leaves(s_params),
    strict=True,
  ):
    assert g.sharding.spec == P(None, *p.sharding.spec)
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
  # OSGD on the sharded stacked gradients moves only K×K Gram blocks.
  tx = osgd_jax.osgd(num_exits=3)
  update = jax.jit(tx.update)
  hlo = update.lower(grads, tx.init(s_params), s_params).compile().as_text()
  found = [(m.group(2), m.group(1)) for m in _COLLECTIVE.finditer(hlo)]
  assert found and all(op == "all-reduce" for op, _ in found), found
  for _, shape in found:
    for dims in re.findall(r"\[([\d,]*)\]", shape):
      sizes = [int(d) for d in dims.split(",") if d]
      assert all(d <= 3 for d in sizes[-2:]), shape
