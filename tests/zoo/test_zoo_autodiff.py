"""Every zoo model is plain JAX: forward mode agrees with a float64 central
difference, and the gradient's lowered program holds no custom calls (no
native kernels on any backend). Forward against reverse mode, for every
name: tests/zoo/test_zoo_properties.py.

The models are tiny and run BatchNorm in train mode (batch statistics), the
way they are trained.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_anytime import like, tiny_batch, tiny_setup

from osgd_jax import zoo

TINY = dict(stages=3, width=2, depth=1, norm="batch")
BATCH = 4
# XLA:CPU's optimisation passes dominate the compile time of these tiny
# programs.
jit = functools.partial(
  jax.jit, compiler_options={"xla_backend_optimization_level": 0}
)


def build(name: str) -> tuple[zoo.AnytimeNet, np.ndarray]:
  fit = dict(in_features=16) if name.endswith("mlp") else {}
  if name.endswith("transformer"):
    # LayerNorm over 2 features is ill-conditioned: float32 rounding would
    # swamp the dot-product test.
    fit = dict(width=4)
  preset, config = tiny_setup(name, **{**TINY, **fit})
  model = zoo.create(name, rngs=nnx.Rngs(0), preset=preset, **config)
  x, _ = tiny_batch(name, preset, config, BATCH)
  return model, x


def tokens(x: np.ndarray) -> bool:
  """Token ids are not differentiable: only the parameters get tangents."""
  return x.dtype == np.int32


def logits_fn(
  model: zoo.AnytimeNet,
) -> tuple[Callable[..., jax.Array], Any, Any]:
  """``f(params, rest, x) -> (K, batch, classes)``, BatchNorm in train mode."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def f(params, rest, x):
    return nnx.merge(graphdef, params, rest, copy=True)(x)

  return f, params, rest


@pytest.mark.parametrize(
  "name",
  ["nested-width-resnet", "nested-depth-mlp", "nested-width-transformer"],
)
def test_jvp_equals_a_float64_central_difference(name):
  model, x = build(name)
  f, params, rest = logits_fn(model)
  with jax.enable_x64(True):
    # jnp arrays: BatchNorm writes its statistics into (copies of) `rest`.
    def to64(t):
      return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)

    params, rest, x = to64(params), to64(rest), to64(x)
    t_params, t_x = like(params, 2), like(x, 3)
    eps = 1e-6

    @jit
    def run(params, x, t_params, t_x):
      def step(s):
        return f(
          jax.tree.map(lambda p, t: p + s * t, params, t_params),
          rest,
          x + s * t_x,
        )

      out, jt = jax.jvp(
        lambda p, x: f(p, rest, x), (params, x), (t_params, t_x)
      )
      return out, jt, (step(eps) - step(-eps)) / (2 * eps)

    out, jt, difference = jax.device_get(run(params, x, t_params, t_x))
  assert out.dtype == jt.dtype == np.float64
  assert np.all(np.abs(jt).max(axis=(1, 2)) > 0)
  np.testing.assert_allclose(
    jt, difference, rtol=1e-6, atol=1e-7 * np.abs(jt).max()
  )


def lowered_gradient(name: str) -> str:
  """StableHLO text of the gradient of the zoo model's summed exit losses."""
  model, x = build(name)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  _, labels = tiny_batch(name, *tiny_setup(name, **TINY), BATCH)
  loss_fn = zoo.per_exit_loss_fn(graphdef)

  def total_loss(params, rest, x, labels):
    losses, new_rest = loss_fn(params, rest, x, labels)
    return losses.sum(), new_rest

  grad = jax.grad(total_loss, has_aux=True)
  return jax.jit(grad).lower(params, rest, x, labels).as_text()


@pytest.mark.parametrize("name", zoo.names())
def test_gradient_program_has_no_custom_calls(name):
  text = lowered_gradient(name)
  op = (
    "stablehlo.convolution"
    if name.endswith(("resnet", "conv1d"))
    else ("stablehlo.dot_general")
  )
  assert op in text  # the layers are in the program
  assert "custom_call" not in text


def test_a_custom_call_in_a_lowered_program_is_found():
  # The check above can fail: a LAPACK (CPU) or cuSOLVER (GPU) call is a
  # custom call in the lowered text.
  text = jax.jit(jnp.linalg.cholesky).lower(jnp.eye(3)).as_text()
  assert "custom_call" in text
