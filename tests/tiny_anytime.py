"""Tiny anytime networks and a cheap compile, shared by the tests.

Compilation dominates these tests on a CPU, so every model is tiny, and each
comparison is compiled as one function with XLA:CPU's cheapest settings: the
paths it compares get the same code generator, and the compile takes a
fraction of the time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from osgd_jax import zoo

FAST_COMPILE = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
  "xla_cpu_use_fusion_emitters": False,
}
# Exit 2 has weight 0: its gradient rows must be exactly zero.
WEIGHTS = (1.0, 0.0, 2.0)
BATCH = 4


def compile_cheaply(
  fn: Callable[..., Any] | None, *args: Any, jitted: Any = None
) -> Any:
  """Compiles ``jax.jit(fn)`` (or ``jitted``) for ``args``, cheaply on CPU."""
  lowered = (jitted or jax.jit(fn)).lower(*args)
  if jax.default_backend() != "cpu":
    return lowered.compile()
  try:
    return lowered.compile(FAST_COMPILE)
  except Exception as e:  # an XLA without these options: compile as usual
    if "compile option" not in str(e):
      raise
    return lowered.compile()


def tiny_net(name: str, **config: Any) -> tuple[Any, jax.Array, jax.Array]:
  """A 3-exit zoo model ``name`` of width 4, with a batch ``(x, y)`` for it."""
  conv = "resnet" in name
  fit = dict(in_channels=1, downsamples=1) if conv else dict(in_features=64)
  model = zoo.create(
    name,
    rngs=nnx.Rngs(0),
    width=4,
    depth=1,
    stages=3,
    norm="batch",
    **{**fit, **config},
  )
  shape = (BATCH, 8, 8, 1) if conv else (BATCH, 64)
  x = jax.random.normal(jax.random.key(1), shape)
  y = jnp.arange(BATCH, dtype=jnp.int32) % 10
  return model, x, y


class TwoExitNet(nnx.Module):
  """Exit 1 reads one hidden layer; exit 2 a second one on top of it.

  Exit 1 does not reach ``deeper`` or ``head2``, so its gradient rows on
  them are zero (degenerate for OSGD).
  """

  def __init__(
    self,
    rngs: nnx.Rngs,
    in_features: int = 8,
    width: int = 16,
    classes: int = 4,
  ):
    self.body = nnx.Linear(in_features, width, rngs=rngs)
    self.head1 = nnx.Linear(width, classes, rngs=rngs)
    self.deeper = nnx.Linear(width, width, rngs=rngs)
    self.head2 = nnx.Linear(width, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.body(x))
    deep = jax.nn.relu(self.deeper(h))
    return jnp.stack([self.head1(h), self.head2(deep)])
