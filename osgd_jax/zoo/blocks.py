"""Building blocks shared by every family of the model zoo.

Each family is written once, against a :class:`Backbone` that says what a
"layer" is: a 3×3 convolution on NHWC images (``conv``, the ResNet-style
backbone), a width-3 convolution on 1-D signals (``conv1d``, shaped
``(batch, length, channels)``) or a dense layer on feature vectors
(``dense``, the MLP backbone). The transformer backbone
(:mod:`osgd_jax.zoo.transformer`) is a subclass whose layers are pre-norm
attention blocks.
The families only wire layers together; the layers themselves live here:

* :class:`Stem` – ``linear -> norm -> relu`` from the input to the first width;
* :class:`ResidualLayer` – a basic residual block with *several* inputs;
* :class:`Head` – ``global average pool -> dense`` to the class logits.

A residual layer with inputs ``x_1 .. x_m`` computes::

    x_1 ─┬─ lin_1 ─┐
    x_2 ─┼─ lin_2 ─┼─ (+) ─ norm ─ relu ─ lin ─ norm ─ (+) ─ relu ─> y
    ...  │   ...  ─┘                                   │
         └────────────── skip (identity or 1×1) ───────┘

``sum_i lin_i(x_i)`` equals one ``lin`` applied to the channel concatenation
of the inputs, but lets each input have its own stride: the interlaced
(depth-nested) families feed a high-resolution chain and a lower-resolution
lateral input into one layer. The skip path is always the first input.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from osgd_jax.zoo.batch_norm import BatchNorm

__all__ = [
  "NORMS",
  "BACKBONE_KINDS",
  "require_int",
  "Backbone",
  "conv_backbone",
  "conv1d_backbone",
  "dense_backbone",
  "make_norm",
  "group_norm_groups",
  "group_widths",
  "fan_in_init",
  "Stem",
  "ResidualLayer",
  "Head",
]

#: The normalisations a backbone's layers can use (``norm=``).
NORMS = ("batch", "group", "layer", "none")
#: :class:`Backbone` kinds: 3×3 convolutions on NHWC images, width-3
#: convolutions on 1-D signals, an MLP, or transformer blocks.
BACKBONE_KINDS = ("conv", "conv1d", "dense", "transformer")


def require_int(name: str, value: Any, minimum: int) -> None:
  """Raises a ``ValueError`` unless ``value`` is an int ``>= minimum``.

  A bool is not accepted as an int: ``stages=True`` is a mistake, not 1.

  Args:
    name: the setting's name, as the caller spells it.
    value: the value given.
    minimum: the smallest value allowed.

  Example:
    >>> require_int("width", 8, 1)
    >>> require_int("width", 0, 1)
    Traceback (most recent call last):
    ...
    ValueError: width must be an int >= 1, got 0.
  """
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _unit_truncated_normal(key: jax.Array, size: int, dtype: Any) -> jax.Array:
  return jax.random.truncated_normal(key, -2.0, 2.0, (size,), dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _shape_kernel(flat: jax.Array, shape: tuple[int, ...], std: float):
  return (flat[: math.prod(shape)] * std).reshape(shape)


def fan_in_init(scale: float) -> Any:
  """Truncated-normal fan-in initialiser with variance ``scale / fan_in``.

  The distribution of ``variance_scaling(scale, "fan_in",
  "truncated_normal")``. It is drawn as a flat vector whose length is rounded
  up to a power of two, then cut and reshaped: XLA:CPU spends seconds
  compiling the random-bit generator for each new rank-4 kernel shape, and a
  zoo model has dozens of kernel shapes; this way a few vector lengths cover
  them all.

  Args:
    scale: 2.0 for He initialisation (layers followed by a ReLU), 1.0 for
      LeCun (the exit heads).

  Returns:
    An initialiser ``init(key, shape, dtype=jnp.float32)``.
  """

  def init(
    key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32
  ) -> jax.Array:
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    # 0.8796... is the std of a standard normal truncated to [-2, 2].
    std = math.sqrt(scale / math.prod(shape[:-1])) / 0.87962566103423978
    padded = 1 << max(size - 1, 0).bit_length()
    flat = _unit_truncated_normal(key, padded, jnp.dtype(dtype))
    return _shape_kernel(flat, shape, std)

  return init


he_normal = fan_in_init(2.0)
lecun_normal = fan_in_init(1.0)


@dataclasses.dataclass(frozen=True)
class Backbone:
  """What a layer is: a convolution (``conv``, ``conv1d``) or a dense map.

  Every zoo family takes one as its first argument; build it with
  :func:`conv_backbone` (a ResNet-style network), :func:`conv1d_backbone`
  (a 1-D ResNet on signals), :func:`dense_backbone` (an MLP) or
  :func:`~osgd_jax.zoo.transformer.transformer_backbone`. The families make
  their layers with :meth:`stem`, :meth:`layer` and :meth:`head`.

  Attributes:
    kind: ``"conv"`` for NHWC images, ``"conv1d"`` for ``(batch, length,
      channels)`` signals, ``"dense"`` for feature vectors, ``"transformer"``
      (built by ``transformer_backbone`` only).
    in_features: input channels (``conv``, ``conv1d``) or input features
      (``dense``).
    downsamples: how many stride-2 halvings of the resolution the network
      makes (``conv`` and ``conv1d`` only; always 0 otherwise). Each halving
      doubles the width, as in ResNet.
  """

  kind: str
  in_features: int
  downsamples: int = 0

  def __post_init__(self):
    if self.kind not in BACKBONE_KINDS:
      raise ValueError(
        f"Unknown backbone kind {self.kind!r}; choose one of"
        f" {BACKBONE_KINDS}, or build the backbone with conv_backbone(...)"
        " or dense_backbone(...)."
      )
    require_int("in_features", self.in_features, 1)
    require_int("downsamples", self.downsamples, 0)
    if self.kind in ("dense", "transformer") and self.downsamples:
      raise ValueError(
        f"A {self.kind} backbone has no resolution to halve, got"
        f" downsamples={self.downsamples}; use downsamples=0, or"
        " conv_backbone(...) for images."
      )

  @property
  def spatial_axes(self) -> tuple[int, ...]:
    """The axes a head pools over (height and width, length, or none)."""
    return {"conv": (1, 2), "conv1d": (1,)}.get(self.kind, ())

  def stem(self, out_features: int, *, norm: str, rngs: nnx.Rngs) -> nnx.Module:
    """The module from the network input to ``out_features``: a Stem."""
    return Stem(self, out_features, norm=norm, rngs=rngs)

  def layer(
    self,
    in_features: Sequence[int],
    out_features: int,
    *,
    strides: Sequence[int] | None = None,
    norm: str,
    rngs: nnx.Rngs,
  ) -> nnx.Module:
    """A layer reading several inputs (a :class:`ResidualLayer`)."""
    return ResidualLayer(
      self, in_features, out_features, strides=strides, norm=norm, rngs=rngs
    )

  def head(
    self, in_features: int, num_classes: int, *, rngs: nnx.Rngs
  ) -> nnx.Module:
    """An exit head on ``in_features`` channels (a :class:`Head`)."""
    return Head(self, in_features, num_classes, rngs=rngs)

  def linear(
    self,
    in_features: int,
    out_features: int,
    *,
    stride: int = 1,
    use_bias: bool,
    rngs: nnx.Rngs,
    kernel: int = 3,
  ) -> nnx.Module:
    """A 3×3 (or ``kernel``×``kernel``) convolution, or a dense layer."""
    if self.kind in ("conv", "conv1d"):
      rank = len(self.spatial_axes)
      return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(kernel,) * rank,
        strides=(stride,) * rank,
        padding="SAME",
        use_bias=use_bias,
        kernel_init=he_normal,
        rngs=rngs,
      )
    return nnx.Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      kernel_init=he_normal,
      rngs=rngs,
    )

  def levels(self, depth: int) -> tuple[int, ...]:
    """Resolution level (number of halvings so far) of a chain's layers.

    The first layer keeps the stem's resolution; each of the next
    ``downsamples`` layers halves it; later layers keep the last resolution.
    """
    return tuple(min(i, self.downsamples) for i in range(depth))

  def scale(self, width: int, level: int) -> int:
    """Width of a layer at ``level``: doubles per halving, as in ResNet."""
    return width * 2**level

  def prepare(self, x: jax.Array) -> jax.Array:
    """Validates a batch of inputs and brings it to the backbone's layout."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(jnp.float32)
    if self.kind == "conv":
      if x.ndim == 3 and self.in_features == 1:
        x = x[..., None]  # grey images given as (batch, height, width)
      if x.ndim != 4 or x.shape[-1] != self.in_features:
        raise ValueError(
          f"This convolutional model expects a batch of NHWC images of shape"
          f" (batch, height, width, {self.in_features}), got shape"
          f" {tuple(x.shape)}. Reshape the input (e.g. `x.reshape(-1, 8, 8,"
          f" 1)` for flat 8×8 digits) or build the model with"
          f" in_channels={x.shape[-1] if x.ndim else '?'}."
        )
      return x
    if self.kind == "conv1d":
      if x.ndim == 2 and self.in_features == 1:
        x = x[..., None]  # one-channel signals given as (batch, length)
      if x.ndim != 3 or x.shape[-1] != self.in_features:
        raise ValueError(
          f"This 1-D convolutional model expects a batch of signals of shape"
          f" (batch, length, {self.in_features}), got shape"
          f" {tuple(x.shape)}. Reshape the input (e.g. `x.reshape(-1, 40,"
          f" 1)` for MNIST-1D) or build the model with"
          f" in_channels={x.shape[-1] if x.ndim else '?'}."
        )
      return x
    if x.ndim < 2 or math.prod(x.shape[1:]) != self.in_features:
      raise ValueError(
        f"This MLP expects a batch of shape (batch, {self.in_features}) (or"
        f" (batch, ...) with {self.in_features} values per example), got"
        f" shape {tuple(x.shape)}. Build the model with in_features equal"
        " to the number of values per example."
      )
    return x.reshape(x.shape[0], self.in_features)

  def pool(self, h: jax.Array) -> jax.Array:
    """Global average pooling over the spatial axes (identity for dense)."""
    return h.mean(axis=self.spatial_axes) if self.spatial_axes else h


def conv_backbone(in_channels: int, downsamples: int) -> Backbone:
  """The ResNet-style backbone: 3×3 convolutions on NHWC images.

  Args:
    in_channels: image channels (3 for CIFAR, 1 for grey digits).
    downsamples: stride-2 halvings of the resolution, each doubling the
      width (2 for 32×32 images, 1 for 8×8 digits, 0 for none).

  Returns:
    The :class:`Backbone` to pass to a zoo family.

  Example:
    >>> conv_backbone(in_channels=3, downsamples=2)
    Backbone(kind='conv', in_features=3, downsamples=2)
  """
  require_int("in_channels", in_channels, 1)
  require_int("downsamples", downsamples, 0)
  return Backbone("conv", in_channels, downsamples)


def conv1d_backbone(in_channels: int, downsamples: int) -> Backbone:
  """The 1-D ResNet backbone: width-3 convolutions on signals.

  Layers are those of :func:`conv_backbone` with one spatial axis: inputs
  are ``(batch, length, channels)`` (``(batch, length)`` for one channel),
  as MNIST-1D's 40-sample signals.

  Args:
    in_channels: signal channels (1 for MNIST-1D).
    downsamples: stride-2 halvings of the length, each doubling the width
      (2 takes MNIST-1D's 40 samples to 10).

  Returns:
    The :class:`Backbone` to pass to a zoo family.

  Example:
    >>> conv1d_backbone(in_channels=1, downsamples=2)
    Backbone(kind='conv1d', in_features=1, downsamples=2)
  """
  require_int("in_channels", in_channels, 1)
  require_int("downsamples", downsamples, 0)
  return Backbone("conv1d", in_channels, downsamples)


def dense_backbone(in_features: int) -> Backbone:
  """The MLP backbone: dense layers on feature vectors.

  Args:
    in_features: values per example (64 for flattened 8×8 digits); inputs
      with more axes are flattened to this many.

  Returns:
    The :class:`Backbone` to pass to a zoo family.

  Example:
    >>> dense_backbone(in_features=64)
    Backbone(kind='dense', in_features=64, downsamples=0)
  """
  require_int("in_features", in_features, 1)
  return Backbone("dense", in_features, 0)


def group_widths(width: int, stages: int) -> tuple[int, ...]:
  """Group widths ``(w, w, 2w, 4w, ...)``: the total doubles per stage.

  Example:
    >>> group_widths(8, 4)
    (8, 8, 16, 32)
  """
  return tuple(width * 2 ** max(k - 1, 0) for k in range(stages))


def group_norm_groups(features: int) -> int:
  """Number of GroupNorm groups for ``features`` channels.

  The largest divisor of ``features`` that is at most 32 and leaves groups of
  at least 4 channels (or one group, for fewer than 4): a group of one
  channel of a dense layer would normalise a single number to zero.
  """
  min_size = min(4, features)
  return max(
    d
    for d in range(1, min(32, features) + 1)
    if features % d == 0 and features // d >= min_size
  )


def make_norm(norm: str, features: int, *, rngs: nnx.Rngs) -> nnx.Module | None:
  """Creates the normalisation layer named ``norm`` over ``features`` channels.

  ``batch`` is :class:`flax.nnx.BatchNorm` with running statistics (train mode
  until ``model.eval()``), as :class:`osgd_jax.zoo.batch_norm.BatchNorm`,
  whose train-mode step traces in linear time; ``group`` uses
  :func:`group_norm_groups`; ``layer`` normalises over the channels only;
  ``none`` returns ``None``.
  """
  if norm == "batch":
    return BatchNorm(features, momentum=0.9, rngs=rngs)
  if norm == "group":
    return nnx.GroupNorm(
      features, num_groups=group_norm_groups(features), rngs=rngs
    )
  if norm == "layer":
    return nnx.LayerNorm(features, rngs=rngs)
  if norm == "none":
    return None
  raise ValueError(f"Unknown norm {norm!r}; choose one of {NORMS}.")


def _apply(norm: nnx.Module | None, h: jax.Array) -> jax.Array:
  return h if norm is None else norm(h)


class Stem(nnx.Module):
  """``linear -> norm -> relu`` from the network input to ``out_features``.

  Args:
    backbone: the :class:`Backbone`.
    out_features: output width.
    norm: one of :data:`NORMS`.
    rngs: the random generators.

  Example:
    >>> from flax import nnx
    >>> stem = Stem(conv_backbone(3, 2), 8, norm="group", rngs=nnx.Rngs(0))
    >>> stem(jnp.ones((2, 32, 32, 3))).shape
    (2, 32, 32, 8)
  """

  def __init__(
    self, backbone: Backbone, out_features: int, *, norm: str, rngs: nnx.Rngs
  ):
    # A bias in front of a norm is cancelled (batch) or redundant (group/layer).
    self.linear = backbone.linear(
      backbone.in_features, out_features, use_bias=norm == "none", rngs=rngs
    )
    self.norm = make_norm(norm, out_features, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(_apply(self.norm, self.linear(x)))


class ResidualLayer(nnx.Module):
  """A basic residual block whose first linear map reads several inputs.

  Args:
    backbone: the :class:`Backbone`.
    in_features: channels of each input; the first input is also the skip.
    out_features: output channels.
    strides: stride of each input (``conv`` only; 1 or 2). The skip uses the
      first input's stride.
    norm: one of :data:`NORMS`.
    rngs: the random generators.

  Example:
    >>> from flax import nnx
    >>> layer = ResidualLayer(conv_backbone(3, 1), (4, 8), 8, strides=(2, 1),
    ...                       norm="layer", rngs=nnx.Rngs(0))
    >>> layer([jnp.ones((2, 8, 8, 4)), jnp.ones((2, 4, 4, 8))]).shape
    (2, 4, 4, 8)
  """

  def __init__(
    self,
    backbone: Backbone,
    in_features: Sequence[int],
    out_features: int,
    *,
    strides: Sequence[int] | None = None,
    norm: str,
    rngs: nnx.Rngs,
  ):
    strides = tuple(strides or (1,) * len(in_features))
    if len(strides) != len(in_features):
      raise ValueError(
        f"Got {len(in_features)} inputs but {len(strides)} strides."
      )
    bias = norm == "none"
    self.inputs = nnx.List(
      [
        backbone.linear(f, out_features, stride=s, use_bias=bias, rngs=rngs)
        for f, s in zip(in_features, strides, strict=True)
      ]
    )
    self.norm1 = make_norm(norm, out_features, rngs=rngs)
    self.linear = backbone.linear(
      out_features, out_features, use_bias=bias, rngs=rngs
    )
    self.norm2 = make_norm(norm, out_features, rngs=rngs)
    if in_features[0] == out_features and strides[0] == 1:
      self.skip = None
    else:
      self.skip = backbone.linear(
        in_features[0],
        out_features,
        stride=strides[0],
        use_bias=bias,
        rngs=rngs,
        kernel=1,
      )

  def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
    h = functools.reduce(
      jnp.add, [lin(x) for lin, x in zip(self.inputs, inputs, strict=True)]
    )
    h = jax.nn.relu(_apply(self.norm1, h))
    h = _apply(self.norm2, self.linear(h))
    skip = inputs[0] if self.skip is None else self.skip(inputs[0])
    return jax.nn.relu(h + skip)


class Head(nnx.Module):
  """Exit head: global average pooling (``conv``) then a dense classifier.

  Args:
    backbone: the :class:`Backbone`.
    in_features: channels of the features the exit reads.
    num_classes: number of classes.
    rngs: the random generators.

  Example:
    >>> from flax import nnx
    >>> head = Head(conv_backbone(3, 2), 8, 10, rngs=nnx.Rngs(0))
    >>> head(jnp.ones((2, 4, 4, 8))).shape
    (2, 10)
  """

  def __init__(
    self,
    backbone: Backbone,
    in_features: int,
    num_classes: int,
    *,
    rngs: nnx.Rngs,
  ):
    self.backbone = backbone
    self.linear = nnx.Linear(
      in_features, num_classes, kernel_init=lecun_normal, rngs=rngs
    )

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.linear(self.backbone.pool(h))
