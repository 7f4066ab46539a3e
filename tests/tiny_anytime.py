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
import numpy as np
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


# The preset each backbone's tiny models start from, and what the tiny
# transformers read: each family another input kind, so that the four cover
# the image, signal and (causal, per-position) token stems and both position
# codes. Transformers always use LayerNorm (a causal one must).
_TINY_PRESETS = {"resnet": "digits", "mlp": "digits", "conv1d": "mnist1d"}
_TINY_TEXT = dict(length=6, vocab=12, num_classes=12)
_TINY_TRANSFORMERS = {
  "branched-transformer": ("text", _TINY_TEXT),
  "nested-depth-transformer": ("mnist1d", dict(patch=8)),  # 5 tokens
  "nested-width-transformer": ("digits", dict(patch=4)),  # 4 tokens
  "nested-width-depth-transformer": (
    "text",
    dict(_TINY_TEXT, positions="sinusoidal"),
  ),
}


def tiny_setup(name: str, **config: Any) -> tuple[str, dict[str, Any]]:
  """``(preset, config)`` of a tiny ``name``; ``config`` overrides it."""
  if name.endswith("-transformer"):
    preset, fixed = _TINY_TRANSFORMERS[name]
    return preset, {**config, "heads": 2, "norm": "layer", **fixed}
  return _TINY_PRESETS[name.rsplit("-", 1)[1]], dict(config)


def tiny_batch(
  name: str, preset: str, config: dict[str, Any], batch: int, seed: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """A batch ``(x, labels)`` for ``create(name, preset=preset, **config)``.

  Labels are one class per example, or per position for a causal model.
  """
  spec = zoo.input_spec(name, preset, **config)
  rng = np.random.default_rng(seed)
  settings = {**zoo.presets(name)[preset], **config}
  classes = settings["num_classes"]
  if spec.dtype == np.int32:
    x = rng.integers(0, settings["vocab"], (batch, *spec.shape), np.int32)
    labels = rng.integers(0, classes, (batch, *spec.shape), np.int32)
    return x, labels
  x = rng.standard_normal((batch, *spec.shape)).astype(np.float32)
  return x, np.arange(batch, dtype=np.int32) % classes


def like(tree: Any, seed: int) -> Any:
  """Standard normal NumPy arrays shaped like the leaves of ``tree``."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda a: rng.standard_normal(np.shape(a)).astype(np.asarray(a).dtype), tree
  )


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


def tiny_net(name: str, **config: Any) -> tuple[Any, jax.Array, jax.Array]:
  """A 3-exit zoo model ``name`` of width 4, with a batch ``(x, y)`` for it."""
  config = dict(width=4, depth=1, stages=3, norm="batch", **config)
  preset, config = tiny_setup(name, **config)
  model = zoo.create(name, rngs=nnx.Rngs(0), preset=preset, **config)
  x, y = tiny_batch(name, preset, config, BATCH)
  return model, jnp.asarray(x), jnp.asarray(y)


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
