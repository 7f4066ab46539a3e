"""On-device image augmentation: random crop of the zero-padded image and flip.

Pure JAX on a batch, so it runs inside a jitted train step. The inputs are
already standardised, so zero padding pads with the training-set channel mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["augment", "random_crop", "random_flip"]


def _check_images(images: jax.Array, fn_name: str) -> None:
  if images.ndim != 4:
    raise ValueError(
      f"{fn_name} expects a batch of NHWC images (B, H, W, C), got shape"
      f" {images.shape}; load the dataset with flatten=False."
    )


def random_crop(
  key: jax.Array, images: jax.Array, padding: int = 4
) -> jax.Array:
  """Crops each image at a random offset from its zero-padded version.

  Image ``b`` becomes ``pad(images[b])[i:i + H, j:j + W]`` with ``i, j``
  uniform in ``[0, 2 * padding]``, independently per image.

  Args:
    key: PRNG key.
    images: ``(B, H, W, C)`` batch.
    padding: zero padding on each side, in pixels.

  Returns:
    Array of the same shape and dtype as ``images``.

  Example:
    >>> out = random_crop(jax.random.key(0), jnp.ones((2, 32, 32, 3)))
  """
  _check_images(images, "random_crop")
  if padding < 0:
    raise ValueError(f"padding must be >= 0, got {padding}")
  b, h, w, c = images.shape
  padded = jnp.pad(
    images, ((0, 0), (padding, padding), (padding, padding), (0, 0))
  )
  offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)

  def crop(image, o):
    return jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c))

  return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Mirrors each image left-right with probability 1/2, independently.

  Args:
    key: PRNG key.
    images: ``(B, H, W, C)`` batch.

  Returns:
    Array of the same shape and dtype as ``images``.

  Example:
    >>> out = random_flip(jax.random.key(0), jnp.ones((2, 32, 32, 3)))
  """
  _check_images(images, "random_flip")
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


def augment(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
  """The standard CIFAR augmentation: random crop with padding, then flip.

  Args:
    key: PRNG key, e.g. from ``augment_key(run_key, epoch, step)``.
    images: ``(B, H, W, C)`` batch.
    padding: zero padding on each side before cropping.

  Returns:
    Array of the same shape and dtype as ``images``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from osgd_jax.app.data import augment, augment_key
    >>> step_key = augment_key(jax.random.key(0), epoch=0, step=0)
    >>> out = jax.jit(augment)(step_key, jnp.ones((8, 32, 32, 3)))
    >>> out.shape
    (8, 32, 32, 3)
  """
  crop_key, flip_key = jax.random.split(key)
  return random_flip(flip_key, random_crop(crop_key, images, padding))
