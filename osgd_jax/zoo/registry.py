"""Model registry: build any zoo model by name, optionally from a preset.

Names are ``<family>-<backbone>`` with family in ``branched``,
``nested-width``, ``nested-depth``, ``nested-width-depth`` and backbone in
``resnet`` (NHWC images) or ``mlp`` (feature vectors). Every name has two
presets:

* ``cifar``: 32×32×3 images (MLPs: 3072 features), 10 classes, sized for a
  GPU run;
* ``digits``: scikit-learn's 8×8 grey digits (ResNets: ``(batch, 8, 8, 1)``
  images; MLPs: 64 features), 10 classes, small enough that a few epochs
  over 1437 images train in minutes on two CPU cores.

Without a preset the constructor defaults apply: conv models take
32×32×3 images, MLPs 64 features; 10 classes and K=4 exits.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from flax import nnx

from osgd_jax.zoo.base import AnytimeNet
from osgd_jax.zoo.branched import BranchedMLP, BranchedResNet
from osgd_jax.zoo.nested_depth import NestedDepthMLP, NestedDepthResNet
from osgd_jax.zoo.nested_width import NestedWidthMLP, NestedWidthResNet
from osgd_jax.zoo.nested_width_depth import (NestedWidthDepthMLP,
                                             NestedWidthDepthResNet)

__all__ = ["create", "names", "presets", "model_class", "config_keys"]

_MODELS: dict[str, type[AnytimeNet]] = {
    "branched-resnet": BranchedResNet,
    "nested-width-resnet": NestedWidthResNet,
    "nested-depth-resnet": NestedDepthResNet,
    "nested-width-depth-resnet": NestedWidthDepthResNet,
    "branched-mlp": BranchedMLP,
    "nested-width-mlp": NestedWidthMLP,
    "nested-depth-mlp": NestedDepthMLP,
    "nested-width-depth-mlp": NestedWidthDepthMLP,
}

_CIFAR_CONV = dict(stages=4, num_classes=10, in_channels=3, downsamples=2)
_DIGITS_CONV = dict(stages=4, num_classes=10, in_channels=1, downsamples=1)
_CIFAR_MLP = dict(stages=4, num_classes=10, in_features=3072)
_DIGITS_MLP = dict(stages=4, num_classes=10, in_features=64)

# Sizes per family: (width, depth) for cifar and for digits.
_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "branched-resnet": {
        "cifar": dict(_CIFAR_CONV, width=16, depth=2),
        "digits": dict(_DIGITS_CONV, width=8, depth=1)},
    "nested-width-resnet": {
        "cifar": dict(_CIFAR_CONV, width=8, depth=3),
        "digits": dict(_DIGITS_CONV, width=4, depth=2)},
    "nested-depth-resnet": {
        "cifar": dict(_CIFAR_CONV, width=16, depth=3),
        "digits": dict(_DIGITS_CONV, width=8, depth=2)},
    "nested-width-depth-resnet": {
        "cifar": dict(_CIFAR_CONV, width=8, depth=3),
        "digits": dict(_DIGITS_CONV, width=4, depth=1)},
    "branched-mlp": {
        "cifar": dict(_CIFAR_MLP, width=256, depth=1),
        "digits": dict(_DIGITS_MLP, width=64, depth=1)},
    "nested-width-mlp": {
        "cifar": dict(_CIFAR_MLP, width=64, depth=2),
        "digits": dict(_DIGITS_MLP, width=16, depth=2)},
    "nested-depth-mlp": {
        "cifar": dict(_CIFAR_MLP, width=256, depth=1),
        "digits": dict(_DIGITS_MLP, width=64, depth=1)},
    "nested-width-depth-mlp": {
        "cifar": dict(_CIFAR_MLP, width=64, depth=1),
        "digits": dict(_DIGITS_MLP, width=16, depth=1)},
}


def names() -> tuple[str, ...]:
  """The registered model names, sorted.

  Example:
    >>> "nested-width-resnet" in names()
    True
  """
  return tuple(sorted(_MODELS))


def _check_name(name: Any) -> str:
  if name not in _MODELS:
    raise ValueError(
        f"Unknown model {name!r}; choose one of: {', '.join(names())}.")
  return name


def model_class(name: str) -> type[AnytimeNet]:
  """The model class registered as ``name``.

  Example:
    >>> model_class("branched-mlp").__name__
    'BranchedMLP'
  """
  return _MODELS[_check_name(name)]


def config_keys(name: str) -> tuple[str, ...]:
  """The configuration keywords ``create(name, ...)`` accepts (not ``rngs``)."""
  params = inspect.signature(model_class(name).__init__).parameters
  return tuple(p for p in params if p not in ("self", "rngs"))


def presets(name: str) -> dict[str, dict[str, Any]]:
  """The presets of model ``name``: preset name -> constructor config.

  Args:
    name: a registered model name.

  Returns:
    A fresh dict, e.g. ``{"cifar": {...}, "digits": {...}}``.

  Example:
    >>> presets("nested-width-mlp")["digits"]["in_features"]
    64
  """
  return copy.deepcopy(_PRESETS[_check_name(name)])


def create(
    name: str,
    *,
    rngs: nnx.Rngs,
    preset: str | None = None,
    **config: Any,
) -> AnytimeNet:
  """Builds the zoo model ``name``.

  Args:
    name: one of :func:`names`.
    rngs: the random generators for the parameters.
    preset: optional preset name (see :func:`presets`); explicit ``config``
      entries override the preset's.
    **config: constructor arguments of the model class (``stages``,
      ``width``, ``depth``, ``num_classes``, ``norm`` and ``in_channels``
      plus ``downsamples`` for ResNets, ``in_features`` for MLPs).

  Returns:
    The model, an :class:`~osgd_jax.zoo.base.AnytimeNet` in train mode.

  Raises:
    ValueError: for an unknown name, preset or config key, or a bad value.

  Example:
    >>> from flax import nnx
    >>> model = create("nested-depth-mlp", rngs=nnx.Rngs(0), preset="digits")
    >>> model.num_exits
    4
  """
  cls = model_class(name)
  if not isinstance(rngs, nnx.Rngs):
    raise ValueError(
        f"rngs must be a flax.nnx.Rngs, got {type(rngs).__name__}; pass e.g."
        " rngs=nnx.Rngs(0).")
  settings: dict[str, Any] = {}
  if preset is not None:
    available = _PRESETS[name]
    if preset not in available:
      raise ValueError(
          f"Unknown preset {preset!r} for {name!r}; choose one of:"
          f" {', '.join(sorted(available))}.")
    settings.update(available[preset])
  valid = config_keys(name)
  unknown = sorted(set(config) - set(valid))
  if unknown:
    raise ValueError(
        f"Unknown config key(s) {unknown} for {name!r}; valid keys are:"
        f" {', '.join(valid)}.")
  settings.update(config)
  return cls(rngs=rngs, **settings)
