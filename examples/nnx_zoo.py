"""A zoo model with BatchNorm, nnx.Optimizer and OSGD on scikit-learn digits.

The model form of ``value_and_per_exit_grads`` (``docs/guides/nnx.md``):
``loss_fn(model, x, y)`` returns the K exit losses; the gradients come back
as an ``nnx.State`` with a leading K axis, which ``nnx.Optimizer(model,
osgd_sgd(...), wrt=nnx.Param)`` takes, and the model's BatchNorm running
statistics are updated once per step, inside ``nnx.jit``. A zoo model is
differentiated by the staged Jacobian (exit k's backward pass covers stages
1..k only). After training, ``model.eval()`` switches BatchNorm to its
running averages, so each example's prediction no longer depends on the
rest of its batch. It needs the library and scikit-learn (for its bundled
8x8 digits; nothing is downloaded), not ``osgd_jax.app``.

Run: ``python examples/nnx_zoo.py [--steps N] [--model NAME] [--stages K]
[--seed S]``
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn import datasets

import osgd_jax
from osgd_jax import zoo


def load_digits(
  rng: np.random.Generator, test_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The 1797 digits as ``(8, 8, 1)`` images, standardised, split at random."""
  pixels, labels = datasets.load_digits(return_X_y=True)
  images = (pixels.reshape(-1, 8, 8, 1) / 16.0).astype(np.float32)
  order = rng.permutation(len(images))
  n_test = int(test_fraction * len(images))
  test, train = order[:n_test], order[n_test:]
  # The training pixels' mean and std, so that no test image leaks in.
  mean, std = images[train].mean(), images[train].std()
  images = (images - mean) / std
  labels = labels.astype(np.int32)
  return images[train], labels[train], images[test], labels[test]


def loss_fn(model: zoo.AnytimeNet, x: jax.Array, y: jax.Array) -> jax.Array:
  """The ``(K,)`` exit losses; the model is called once, so it is staged."""
  return osgd_jax.per_exit_cross_entropy(model(x), y)


@nnx.jit
def train_step(model, optimizer, x, y):
  losses, grads = osgd_jax.value_and_per_exit_grads(loss_fn)(model, x, y)
  optimizer.update(model, grads)  # OSGD projection, then momentum SGD
  return losses  # the BatchNorm statistics moved in place


@nnx.jit
def logits_of(model, x):
  return model(x)  # (K, batch, classes)


def batch_statistics(model: nnx.Module) -> list[np.ndarray]:
  """Copies of every BatchNorm running mean and variance."""
  return [np.array(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument(
    "--model", default="nested-depth-mlp", choices=zoo.names()
  )
  parser.add_argument(
    "--stages", type=int, help="exits K (default: the digits preset's, 4)"
  )
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  rng = np.random.default_rng(args.seed)
  x_train, y_train, x_test, y_test = load_digits(rng)
  sizes = {} if args.stages is None else {"stages": args.stages}
  model = zoo.create(
    args.model, rngs=nnx.Rngs(args.seed), preset="digits", **sizes
  )
  k = model.num_exits
  optimizer = nnx.Optimizer(
    model, osgd_jax.osgd_sgd(0.1, num_exits=k), wrt=nnx.Param
  )
  before = batch_statistics(model)

  print(f"{args.model}: {k} exits, devices: {jax.devices()}")
  print("step   " + "  ".join(f"loss_exit{i}" for i in range(1, k + 1)))
  history = []
  for step in range(1, args.steps + 1):
    chosen = rng.choice(len(x_train), args.batch_size, replace=False)
    losses = train_step(model, optimizer, x_train[chosen], y_train[chosen])
    history.append(np.asarray(losses))
    if step == 1 or step % 50 == 0 or step == args.steps:
      print(f"{step:5d}  " + "  ".join(f"{v:10.4f}" for v in losses))
  # Averages over the first and last tenth of the steps, less noisy than
  # single batches.
  tenth = max(1, args.steps // 10)
  first = np.mean(history[:tenth], axis=0)
  last = np.mean(history[-tenth:], axis=0)
  print(
    "mean loss per exit, first steps: " + ", ".join(f"{v:.4f}" for v in first)
  )
  print(
    "mean loss per exit, last steps: " + ", ".join(f"{v:.4f}" for v in last)
  )
  moved = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(before, batch_statistics(model), strict=True)
  )
  print(f"largest change of a BatchNorm running statistic: {moved:.4f}")

  model.eval()  # BatchNorm uses its running averages from here on
  logits = logits_of(model, x_test)
  again = logits_of(model, x_test)
  # In eval mode an example's logits do not depend on its batch: the first
  # eight test images alone give the same logits as within the whole set.
  alone = logits_of(model, x_test[:8])
  deterministic = bool(jnp.array_equal(logits, again))
  per_example = bool(jnp.allclose(alone, logits[:, :8], atol=1e-5))
  accuracy = (logits.argmax(-1) == y_test).mean(-1)
  print(f"eval mode deterministic: {deterministic}")
  print(f"eval mode independent of the batch: {per_example}")
  print("test accuracy per exit: " + ", ".join(f"{a:.3f}" for a in accuracy))
  model.train()


if __name__ == "__main__":
  main()
