"""The base class of every zoo model: K stages, K exits, run in order.

An :class:`AnytimeNet` is nothing but an :class:`flax.nnx.List` of stage
modules plus the input check. Stage k owns every parameter it introduces,
its exit head included, and maps the carry of stages 1..k-1 to its own carry
and its exit's logits::

    x ─ input_carry ─> carry_0 ─ stages[0] ─> carry_1 ─ stages[1] ─> ...
                                     │                      │
                                 logits_1               logits_2

The carry is a plain pytree of arrays (its layout is documented per family),
so the stages can be driven one by one: for anytime inference, or to keep
each stage's VJP for the staged per-exit gradient.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from osgd_jax.zoo.blocks import NORMS, Backbone, require_int

__all__ = [
  "AnytimeNet",
  "MAX_LAYERS",
  "MAX_WIDTH",
  "check_config",
  "check_size",
]

# The largest network a family builds: a configuration beyond these (the
# depth-nested families double their depth with every stage, the
# width-nested ones their width) would take many minutes to build, trace and
# compile, and is refused up front instead.

#: The most residual layers a model may have (see :func:`check_size`).
MAX_LAYERS = 256
#: The most features (channels) a model's widest stage may have.
MAX_WIDTH = 4096


# While osgd_jax.staged reads a user's loss function, the calls of one model
# (a fresh copy it made) return logits that it supplies: that is how it finds
# the loss as a function of the logits. Any other model runs as usual.
_CALL_HOOK: contextvars.ContextVar[
  tuple[Any, Callable[[jax.Array, int | None], jax.Array]] | None
] = contextvars.ContextVar("osgd_jax_zoo_call_hook", default=None)


@contextlib.contextmanager
def replaced_call(
  model: Any, call: Callable[[jax.Array, int | None], jax.Array]
) -> Iterator[None]:
  """Within the block, ``model(x, upto=u)`` returns ``call(x, u)``.

  Only calls of this very object are replaced (not a copy, a view or
  another model), and only ``__call__`` (``predict`` and the stages run as
  usual). The staged Jacobian uses it to read a loss function written
  against the model as a function of the model's logits.

  Args:
    model: the :class:`AnytimeNet` whose calls are replaced.
    call: ``call(x, upto)``, returning what ``model(x, upto=upto)`` should.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from osgd_jax import zoo
    >>> from osgd_jax.zoo.base import replaced_call
    >>> model = zoo.create("branched-mlp", rngs=nnx.Rngs(0), stages=2)
    >>> with replaced_call(model, lambda x, upto: jnp.zeros((2, 1, 10))):
    ...   print(float(model(jnp.ones((1, 64))).sum()))
    0.0
  """
  token = _CALL_HOOK.set((model, call))
  try:
    yield
  finally:
    _CALL_HOOK.reset(token)


def check_config(
  backbone: Any,
  *,
  stages: Any,
  width: Any,
  depth: Any,
  num_classes: Any,
  norm: Any,
) -> None:
  """Raises a ``ValueError`` naming the first bad setting of a zoo family.

  Args:
    backbone: a :class:`~osgd_jax.zoo.blocks.Backbone`.
    stages: number of stages (exits), an int ≥ 1.
    width: base width, an int ≥ 1.
    depth: layers per stage, an int ≥ 1.
    num_classes: an int ≥ 1.
    norm: one of ``NORMS``.

  Example:
    >>> from osgd_jax.zoo.blocks import dense_backbone
    >>> check_config(dense_backbone(64), stages=4, width=8, depth=1,
    ...              num_classes=10, norm="batch")
    >>> check_config(dense_backbone(64), stages=0, width=8, depth=1,
    ...              num_classes=10, norm="batch")
    Traceback (most recent call last):
    ...
    ValueError: stages must be an int >= 1, got 0.
  """
  if not isinstance(backbone, Backbone):
    raise ValueError(
      f"backbone must be a zoo.Backbone, got {type(backbone).__name__};"
      " pass e.g. zoo.conv_backbone(in_channels=3, downsamples=2) for"
      " 32×32 RGB images or zoo.dense_backbone(in_features=64) for 64"
      " features per example."
    )
  for name, value in dict(
    stages=stages, width=width, depth=depth, num_classes=num_classes
  ).items():
    require_int(name, value, 1)
  if norm not in NORMS:
    raise ValueError(f"Unknown norm {norm!r}; choose one of {NORMS}.")


def check_size(
  family: str, stages: int, size: Callable[[int], tuple[int, int]]
) -> None:
  """Refuses a configuration too large to build and compile in minutes.

  Args:
    family: the family's name, for the message.
    stages: the requested number of stages.
    size: ``stages -> (residual layers, widest stage width)`` of the family
      with its other settings fixed.

  Raises:
    ValueError: the network would exceed :data:`MAX_LAYERS` layers or
      :data:`MAX_WIDTH` features; the message gives the largest number of
      stages that fits.

  Example:
    >>> check_size("NestedDepthNet", 4, lambda s: (2 * 2 ** (s - 1), 16))
    >>> check_size(  # doctest: +NORMALIZE_WHITESPACE
    ...     "NestedDepthNet", 12, lambda s: (2 * 2 ** (s - 1), 16))
    Traceback (most recent call last):
    ...
    ValueError: NestedDepthNet with 12 stages would have 4096 residual layers
    and stages up to 16 features wide (at most 256 and 4096 are built):
    building and compiling it would take many minutes. Use at most 8 stages
    with these settings.
  """

  def fits(s: int) -> bool:
    layers, widest = size(s)
    return layers <= MAX_LAYERS and widest <= MAX_WIDTH

  if fits(stages):
    return
  layers, widest = size(stages)
  most = max((s for s in range(1, stages) if fits(s)), default=None)
  advice = (
    f"Use at most {most} stages with these settings."
    if most
    else "Use a smaller depth or width."
  )
  raise ValueError(
    f"{family} with {stages} stages would have {layers} residual layers and"
    f" stages up to {widest} features wide (at most {MAX_LAYERS} and"
    f" {MAX_WIDTH} are built): building and compiling it would take many"
    f" minutes. {advice}"
  )


class AnytimeNet(nnx.Module):
  """Base class: a cascade of stages, each ending in an exit.

  The four families (:class:`~osgd_jax.zoo.branched.BranchedNet`,
  :class:`~osgd_jax.zoo.nested_width.NestedWidthNet`,
  :class:`~osgd_jax.zoo.nested_depth.NestedDepthNet`,
  :class:`~osgd_jax.zoo.nested_width_depth.NestedWidthDepthNet`) build
  ``self.stages`` (an :class:`flax.nnx.List`) and ``self.backbone`` in their
  constructor.

  Attributes:
    stages: the stage modules; ``stages[k-1](carry) -> (new_carry, logits)``.
    backbone: the :class:`~osgd_jax.zoo.blocks.Backbone` (conv or dense).
    num_classes: number of classes of every exit.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from osgd_jax import zoo
    >>> model = zoo.create("nested-depth-mlp", rngs=nnx.Rngs(0), width=8)
    >>> x = jnp.ones((2, 64))
    >>> model(x).shape, model(x, upto=2).shape, model.depth_per_exit()
    ((4, 2, 10), (2, 2, 10), (1, 2, 4, 8))
    >>> carry = model.input_carry(x)
    >>> carry, logits_1 = model.stages[0](carry)  # anytime: stop any time
  """

  stages: nnx.List
  backbone: Backbone
  num_classes: int

  @property
  def num_exits(self) -> int:
    """The number of stages and exits, K."""
    return len(self.stages)

  def input_carry(self, x: jax.Array) -> jax.Array:
    """Validates ``x`` and returns the carry that ``stages[0]`` takes.

    Convolutional models take NHWC images (``(batch, h, w)`` is accepted when
    ``in_channels == 1``); MLPs take ``(batch, in_features)`` and flatten any
    trailing axes.
    """
    return self.backbone.prepare(x)

  def check_upto(self, upto: int | None) -> int:
    """Returns the number of stages to run, or raises a ``ValueError``."""
    k = self.num_exits
    if upto is None:
      return k
    if (
      isinstance(upto, bool)
      or not isinstance(upto, (int, np.integer))
      or not 1 <= upto <= k
    ):
      raise ValueError(
        f"upto must be an int between 1 and the number of exits ({k}),"
        f" got {upto!r}; pass upto=None to compute all exits."
      )
    return int(upto)

  def __call__(self, x: jax.Array, *, upto: int | None = None) -> jax.Array:
    """Computes the logits of exits 1..upto.

    Args:
      x: a batch of inputs (see :meth:`input_carry`).
      upto: compute only stages 1..upto (1-based, a Python int); ``None``
        computes all K.

    Returns:
      The stacked logits, shape ``(upto or K, batch, num_classes)``.
    """
    hook = _CALL_HOOK.get()
    if hook is not None and hook[0] is self:
      return hook[1](x, upto)
    n = self.check_upto(upto)
    carry = self.input_carry(x)
    logits = []
    for stage in self.stages[:n]:
      carry, out = stage(carry)
      logits.append(out)
    return jnp.stack(logits)

  def predict(self, x: jax.Array, *, upto: int | None = None) -> jax.Array:
    """Like ``__call__``, but BatchNorm uses its running averages.

    The module's own mode is left as it is and no statistics change, so this
    is the inference entry point in train mode too, e.g. through
    ``flax.nnx.bridge.ToLinen`` with ``nnx_method="predict"``.

    Args:
      x: a batch of inputs (see :meth:`input_carry`).
      upto: compute only stages 1..upto; ``None`` computes all K.

    Returns:
      The stacked logits, shape ``(upto or K, batch, num_classes)``.
    """
    view = nnx.view(self, use_running_average=True, raise_if_not_found=False)
    return view(x, upto=upto)

  def depth_per_exit(self) -> tuple[int, ...]:
    """Number of layer positions on each exit's path (stem and head excluded).

    A position counts once even when later stages widen it (nested-width).
    """
    depths, total = [], 0
    for stage in self.stages:
      total += stage.depth
      depths.append(total)
    return tuple(depths)
