"""Quickstart: train a small 3-exit network with Orthogonalized SGD.

A cascade of dense layers with a classifier head after each one is trained on
a seeded synthetic task made here with NumPy. Each step computes the three
exit losses' gradients in one pass (``value_and_per_exit_grads``), projects
them with OSGD in priority order and applies momentum SGD, all inside one
jitted function. It uses the library only (no ``osgd_jax.app``), so the
library's install (``python -m pip install -e .`` in a clone) runs it.

Run: ``python examples/quickstart.py [--steps N] [--seed S]``
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import osgd_jax


def make_clusters(
  rng: np.random.Generator, num: int, centres: np.ndarray, noise: float
) -> tuple[np.ndarray, np.ndarray]:
  """``num`` points around the class centres (noise: the Gaussian's std)."""
  labels = rng.permutation(np.arange(num) % len(centres)).astype(np.int32)
  offsets = noise * rng.standard_normal((num, centres.shape[1]))
  return (centres[labels] + offsets).astype(np.float32), labels


def shuffled_batches(
  x: np.ndarray,
  y: np.ndarray,
  batch_size: int,
  rng: np.random.Generator,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of full batches in a random order."""
  order = rng.permutation(len(x))
  for start in range(0, len(x) - batch_size + 1, batch_size):
    chosen = order[start : start + batch_size]
    yield x[chosen], y[chosen]


class ThreeExitMLP(nnx.Module):
  """Three dense stages; exit k reads stage k, so exit 1 is the cheapest."""

  def __init__(
    self, in_features: int, width: int, classes: int, *, rngs: nnx.Rngs
  ):
    dims = [in_features, width, width, width]
    self.stages = nnx.List(
      [nnx.Linear(dims[i], dims[i + 1], rngs=rngs) for i in range(3)]
    )
    self.heads = nnx.List(
      [nnx.Linear(width, classes, rngs=rngs) for _ in range(3)]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    logits = []
    for stage, head in zip(self.stages, self.heads, strict=True):
      x = jax.nn.relu(stage(x))
      logits.append(head(x))
    return jnp.stack(logits)  # (K, batch, classes)


def exit_losses(params, graphdef, rest, x, y):
  logits = nnx.merge(graphdef, params, rest)(x)
  labels = jnp.broadcast_to(y, logits.shape[:-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(
    -1
  )


@nnx.jit
def train_step(model, optimizer, x, y):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  losses, grads = osgd_jax.value_and_per_exit_grads(exit_losses)(
    params, graphdef, rest, x, y
  )  # every grad leaf: (3, *param.shape)
  optimizer.update(model, grads)  # OSGD projection, then momentum SGD
  return losses


@nnx.jit
def accuracy(model, x, y):
  return (model(x).argmax(-1) == y).mean(-1)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  # Ten classes in 32 dimensions: unit-norm centres plus Gaussian noise.
  rng = np.random.default_rng(args.seed)
  centres = rng.standard_normal((10, 32))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  x_train, y_train = make_clusters(rng, 2048, centres, noise=0.3)
  x_test, y_test = make_clusters(rng, 512, centres, noise=0.3)
  model = ThreeExitMLP(32, 64, len(centres), rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(
    model,
    osgd_jax.osgd_sgd(learning_rate=0.05, momentum=0.9, num_exits=3),
    wrt=nnx.Param,
  )

  print(f"devices: {jax.devices()}")
  print("step   " + "  ".join(f"loss_exit{k}" for k in (1, 2, 3)))
  step = 0
  while step < args.steps:
    for x, y in shuffled_batches(x_train, y_train, args.batch_size, rng):
      losses = train_step(model, optimizer, x, y)
      step += 1
      if step == 1 or step % 100 == 0:
        print(f"{step:5d}  " + "  ".join(f"{loss:10.4f}" for loss in losses))
      if step >= args.steps:
        break

  acc = accuracy(model, x_test, y_test)
  cosine = optimizer.opt_state[0].cosine[...]
  print("test accuracy per exit: " + ", ".join(f"{a:.3f}" for a in acc))
  print(
    "gradient cosine between exits 1 and 3 at the last step: "
    f"{cosine[0, 2]:.3f}"
  )


if __name__ == "__main__":
  main()
