"""Model registry: build any zoo model by name, optionally from a preset.

Names are ``<family>-<backbone>`` with family in ``branched``,
``nested-width``, ``nested-depth``, ``nested-width-depth`` and backbone in
``resnet`` (NHWC images), ``conv1d`` (1-D signals), ``mlp`` (feature
vectors) or ``transformer`` (sequences of patches or tokens). The presets,
and which backbones have them:

* ``cifar`` (resnet, mlp, transformer): 32×32×3 images (MLPs: 3072
  features; transformers: a ViT on 4×4 patches), 10 classes, sized for a
  GPU run;
* ``digits`` (resnet, mlp, transformer): scikit-learn's 8×8 grey digits
  (ResNets: ``(batch, 8, 8, 1)`` images; MLPs: 64 features;
  transformers: a ViT on 2×2 patches), 10 classes, small enough that a few
  epochs over 1437 images train in minutes on two CPU cores;
* ``mnist1d`` (conv1d, mlp, transformer): MNIST-1D's 1-D signals of 40
  samples (MLPs: 40 features; transformers: ten 4-sample patches; the
  ResNets convolve 2-D images and have none), 10 classes, sized so that 15
  epochs over 4000 signals train in minutes on two CPU cores;
* ``text`` (transformer): a causal byte-level language model on 128-byte
  windows, one class per byte value, logits per position;
* ``text-small`` (transformer): the same on 64-byte windows at half the
  width, sized so that a comparison of optimizers fits a CPU.

A name is a family class built on a backbone: ``nested-depth-resnet`` is
``NestedDepthNet(conv_backbone(in_channels=..., downsamples=...), ...)``,
``nested-depth-mlp`` is ``NestedDepthNet(dense_backbone(in_features=...),
...)``, ``nested-depth-transformer`` is
``NestedDepthNet(transformer_backbone(...), ...)``. Without a preset,
``-resnet`` names use the ``cifar`` preset, ``-mlp`` and ``-transformer``
names the ``digits`` preset and ``-conv1d`` names the ``mnist1d`` preset
(:func:`default_preset`); every preset has K=4 exits. :func:`input_spec`
gives the input each name and preset reads.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import nnx

from osgd_jax.zoo.base import AnytimeNet
from osgd_jax.zoo.blocks import (
  Backbone,
  conv1d_backbone,
  conv_backbone,
  dense_backbone,
)
from osgd_jax.zoo.branched import BranchedNet
from osgd_jax.zoo.nested_depth import NestedDepthNet
from osgd_jax.zoo.nested_width import NestedWidthNet
from osgd_jax.zoo.nested_width_depth import NestedWidthDepthNet
from osgd_jax.zoo.transformer import TransformerBackbone, transformer_backbone

__all__ = [
  "create",
  "names",
  "presets",
  "model_class",
  "config_keys",
  "default_preset",
  "input_spec",
  "PRESET_INPUTS",
]

_FAMILIES: dict[str, type[AnytimeNet]] = {
  "branched": BranchedNet,
  "nested-width": NestedWidthNet,
  "nested-depth": NestedDepthNet,
  "nested-width-depth": NestedWidthDepthNet,
}

# Name suffix -> (backbone factory, the preset that gives the defaults).
_BACKBONES: dict[str, tuple[Callable[..., Backbone], str]] = {
  "resnet": (conv_backbone, "cifar"),
  "mlp": (dense_backbone, "digits"),
  "conv1d": (conv1d_backbone, "mnist1d"),
  "transformer": (transformer_backbone, "digits"),
}

#: The input each preset is sized for: one example's shape (the
#: convolutional backbones read any size; these are the data sets'). The
#: MLPs flatten it, and the transformers' own settings fix theirs.
PRESET_INPUTS: dict[str, tuple[int, ...]] = {
  "cifar": (32, 32, 3),
  "digits": (8, 8, 1),
  "mnist1d": (40, 1),
}

_MODELS: dict[str, tuple[type[AnytimeNet], str]] = {
  f"{family}-{suffix}": (cls, suffix)
  for family, cls in _FAMILIES.items()
  for suffix in _BACKBONES
}

_CIFAR_CONV = dict(stages=4, num_classes=10, in_channels=3, downsamples=2)
_DIGITS_CONV = dict(stages=4, num_classes=10, in_channels=1, downsamples=1)
_CIFAR_MLP = dict(stages=4, num_classes=10, in_features=3072)
_DIGITS_MLP = dict(stages=4, num_classes=10, in_features=64)
_MNIST1D_MLP = dict(stages=4, num_classes=10, in_features=40)
_MNIST1D_CONV1D = dict(stages=4, num_classes=10, in_channels=1, downsamples=2)
# Transformers: ViT patches on images, 4-sample patches on MNIST-1D, bytes
# for text (a causal language model: one class per byte value).
_DIGITS_VIT = dict(
  stages=4, num_classes=10, norm="layer", input_kind="image", length=8,
  channels=1, patch=2, heads=2,
)  # fmt: skip
_CIFAR_VIT = dict(
  stages=4, num_classes=10, norm="layer", input_kind="image", length=32,
  channels=3, patch=4, heads=4,
)  # fmt: skip
_MNIST1D_SIGNAL = dict(
  stages=4, num_classes=10, norm="layer", input_kind="signal", length=40,
  channels=1, patch=4, heads=4,
)  # fmt: skip
_TEXT = dict(
  stages=4, num_classes=256, norm="layer", input_kind="tokens", length=128,
  vocab=256, heads=4, causal=True,
)  # fmt: skip
# Half the context and half the width: a quarter of the FLOPs per byte of
# the text preset's blocks, for comparisons on a CPU.
_TEXT_SMALL = dict(_TEXT, length=64, heads=2)

# Sizes per name: (width, depth) for cifar, digits and (MLPs) mnist1d.
_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
  "branched-resnet": {
    "cifar": dict(_CIFAR_CONV, width=16, depth=2),
    "digits": dict(_DIGITS_CONV, width=8, depth=1),
  },
  "nested-width-resnet": {
    "cifar": dict(_CIFAR_CONV, width=8, depth=3),
    "digits": dict(_DIGITS_CONV, width=4, depth=2),
  },
  "nested-depth-resnet": {
    "cifar": dict(_CIFAR_CONV, width=16, depth=3),
    "digits": dict(_DIGITS_CONV, width=8, depth=2),
  },
  "nested-width-depth-resnet": {
    "cifar": dict(_CIFAR_CONV, width=8, depth=3),
    "digits": dict(_DIGITS_CONV, width=4, depth=1),
  },
  "branched-mlp": {
    "cifar": dict(_CIFAR_MLP, width=256, depth=1),
    "digits": dict(_DIGITS_MLP, width=64, depth=1),
    "mnist1d": dict(_MNIST1D_MLP, width=64, depth=1),
  },
  "nested-width-mlp": {
    "cifar": dict(_CIFAR_MLP, width=64, depth=2),
    "digits": dict(_DIGITS_MLP, width=16, depth=2),
    "mnist1d": dict(_MNIST1D_MLP, width=16, depth=2),
  },
  "nested-depth-mlp": {
    "cifar": dict(_CIFAR_MLP, width=256, depth=1),
    "digits": dict(_DIGITS_MLP, width=64, depth=1),
    "mnist1d": dict(_MNIST1D_MLP, width=64, depth=1),
  },
  "nested-width-depth-mlp": {
    "cifar": dict(_CIFAR_MLP, width=64, depth=1),
    "digits": dict(_DIGITS_MLP, width=16, depth=1),
    # 16 wide (digits' size), every exit stayed near 50% on MNIST-1D;
    # 24 gains a few points and stays under 500k parameters (32: 660k,
    # 64: 2.6M, for at most 3 points more).
    "mnist1d": dict(_MNIST1D_MLP, width=24, depth=1),
  },
  "branched-conv1d": {"mnist1d": dict(_MNIST1D_CONV1D, width=16, depth=1)},
  "nested-width-conv1d": {"mnist1d": dict(_MNIST1D_CONV1D, width=8, depth=2)},
  "nested-depth-conv1d": {"mnist1d": dict(_MNIST1D_CONV1D, width=16, depth=1)},
  "nested-width-depth-conv1d": {
    "mnist1d": dict(_MNIST1D_CONV1D, width=8, depth=1)
  },
  "branched-transformer": {
    "digits": dict(_DIGITS_VIT, width=32, depth=1),
    "cifar": dict(_CIFAR_VIT, width=64, depth=2),
    "mnist1d": dict(_MNIST1D_SIGNAL, width=32, depth=1),
    "text": dict(_TEXT, width=64, depth=1),
    "text-small": dict(_TEXT_SMALL, width=32, depth=1),
  },
  "nested-width-transformer": {
    # Exit k has heads * 2**(k-1) heads and MLP units: exit 4's blocks are
    # eight times exit 1's.
    "digits": dict(_DIGITS_VIT, width=32, depth=2, heads=1, mlp_ratio=1),
    "cifar": dict(_CIFAR_VIT, width=64, depth=4, heads=1, mlp_ratio=1),
    "mnist1d": dict(_MNIST1D_SIGNAL, width=32, depth=2, heads=1, mlp_ratio=1),
    "text": dict(_TEXT, width=64, depth=2, heads=1, mlp_ratio=1),
    "text-small": dict(_TEXT_SMALL, width=32, depth=2, heads=1, mlp_ratio=1),
  },
  "nested-depth-transformer": {
    "digits": dict(_DIGITS_VIT, width=32, depth=1),
    "cifar": dict(_CIFAR_VIT, width=96, depth=1),
    "mnist1d": dict(_MNIST1D_SIGNAL, width=32, depth=1),
    "text": dict(_TEXT, width=64, depth=1),
    "text-small": dict(_TEXT_SMALL, width=32, depth=1),
  },
  "nested-width-depth-transformer": {
    # Chains double in width: exit 4's is eight times as wide.
    "digits": dict(_DIGITS_VIT, width=8, depth=1),
    "cifar": dict(_CIFAR_VIT, width=16, depth=1),
    "mnist1d": dict(_MNIST1D_SIGNAL, width=8, depth=1),
    "text": dict(_TEXT, width=8, depth=1, heads=2),
    "text-small": dict(_TEXT_SMALL, width=4, depth=1, heads=1),
  },
}


def _keywords(fn: Callable[..., Any], *skip: str) -> tuple[str, ...]:
  params = inspect.signature(fn).parameters
  return tuple(p for p in params if p not in ("self", *skip))


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
      f"Unknown model {name!r}; choose one of: {', '.join(names())}."
    )
  return name


def model_class(name: str) -> type[AnytimeNet]:
  """The family class that builds model ``name`` (on its backbone).

  Both backbones of a family share the class: ``create`` passes it
  :func:`~osgd_jax.zoo.blocks.conv_backbone` for ``-resnet`` names and
  :func:`~osgd_jax.zoo.blocks.dense_backbone` for ``-mlp`` names.

  Example:
    >>> model_class("branched-mlp").__name__
    'BranchedNet'
    >>> model_class("nested-depth-resnet") is model_class("nested-depth-mlp")
    True
  """
  return _MODELS[_check_name(name)][0]


def config_keys(name: str) -> tuple[str, ...]:
  """The configuration keywords ``create(name, ...)`` accepts (not ``rngs``).

  The family's settings followed by the backbone's.

  Example:
    >>> print(*config_keys("nested-depth-resnet"))
    stages width depth num_classes norm in_channels downsamples
    >>> config_keys("nested-depth-mlp")[-1]
    'in_features'
  """
  cls, suffix = _MODELS[_check_name(name)]
  return _keywords(cls.__init__, "backbone", "rngs") + _keywords(
    _BACKBONES[suffix][0]
  )


def presets(name: str) -> dict[str, dict[str, Any]]:
  """The presets of model ``name``: preset name -> ``create`` config.

  Args:
    name: a registered model name.

  Returns:
    A fresh dict, e.g. ``{"cifar": {...}, "digits": {...}}``.

  Example:
    >>> presets("nested-width-mlp")["digits"]["in_features"]
    64
  """
  return copy.deepcopy(_PRESETS[_check_name(name)])


def _settings(
  name: str, preset: str | None, config: dict[str, Any]
) -> tuple[dict[str, Any], Backbone]:
  """The family's settings and the backbone of ``create(name, ...)``."""
  _, suffix = _MODELS[_check_name(name)]
  make_backbone, default_preset = _BACKBONES[suffix]
  available = _PRESETS[name]
  if preset is not None and preset not in available:
    raise ValueError(
      f"Unknown preset {preset!r} for {name!r}; choose one of:"
      f" {', '.join(sorted(available))}."
    )
  valid = config_keys(name)
  unknown = sorted(set(config) - set(valid))
  if unknown:
    raise ValueError(
      f"Unknown config key(s) {unknown} for {name!r}; valid keys are:"
      f" {', '.join(valid)}."
    )
  settings = dict(
    available[default_preset if preset is None else preset], **config
  )
  backbone_keys = _keywords(make_backbone)
  backbone = make_backbone(
    **{k: settings.pop(k) for k in backbone_keys if k in settings}
  )
  return settings, backbone


def default_preset(name: str) -> str:
  """The preset ``create(name)`` starts from when given none.

  Example:
    >>> default_preset("nested-depth-resnet"), default_preset("branched-mlp")
    ('cifar', 'digits')
    >>> default_preset("branched-conv1d")
    'mnist1d'
  """
  return _BACKBONES[_MODELS[_check_name(name)][1]][1]


def input_spec(
  name: str, preset: str | None = None, **config: Any
) -> jax.ShapeDtypeStruct:
  """The input of one example (no batch axis) of ``create(name, ...)``.

  The convolutional backbones read any image size or signal length; their
  spec is the preset's data (:data:`PRESET_INPUTS`) with the configured
  channels. MLPs read a flat vector, transformers what their backbone
  fixes: images, signals, or int32 token ids.

  Args:
    name: one of :func:`names`.
    preset: as for :func:`create` (``None``: the name's default preset).
    **config: the overrides ``create`` would get (e.g. ``in_channels``).

  Returns:
    A ``jax.ShapeDtypeStruct``; add a batch axis to feed the model.

  Raises:
    ValueError: as :func:`create`, for a bad name, preset or config.

  Example:
    >>> input_spec("nested-depth-resnet")
    ShapeDtypeStruct(shape=(32, 32, 3), dtype=float32)
    >>> input_spec("branched-mlp", "mnist1d").shape
    (40,)
    >>> input_spec("branched-transformer", "text")
    ShapeDtypeStruct(shape=(128,), dtype=int32)
  """
  settings, backbone = _settings(name, preset, config)
  del settings
  if isinstance(backbone, TransformerBackbone):
    shape, dtype = backbone.example_shape()
    return jax.ShapeDtypeStruct(shape, dtype)
  if backbone.kind == "dense":
    return jax.ShapeDtypeStruct((backbone.in_features,), jnp.float32)
  size = PRESET_INPUTS[preset or default_preset(name)]
  spatial = size[: len(backbone.spatial_axes)]
  return jax.ShapeDtypeStruct((*spatial, backbone.in_features), jnp.float32)


def create(
  name: str,
  *,
  rngs: nnx.Rngs,
  preset: str | None = None,
  **config: Any,
) -> AnytimeNet:
  """Builds the zoo model ``name``: its family class on its backbone.

  Args:
    name: one of :func:`names`.
    rngs: the random generators for the parameters.
    preset: optional preset name (see :func:`presets`); explicit ``config``
      entries override the preset's. ``None`` starts from
      :func:`default_preset`: ``cifar`` for ``-resnet`` names, ``mnist1d``
      for ``-conv1d`` names and ``digits`` for ``-mlp`` and
      ``-transformer`` names.
    **config: any of :func:`config_keys`: the family's settings
      (``stages``, ``width``, ``depth``, ``num_classes``, ``norm``) and the
      backbone's (``in_channels`` and ``downsamples`` for ``-resnet`` and
      ``-conv1d``, ``in_features`` for ``-mlp``, the
      :func:`~osgd_jax.zoo.transformer_backbone` settings for
      ``-transformer``).

  Returns:
    The model, an :class:`~osgd_jax.zoo.base.AnytimeNet` in train mode.

  Raises:
    ValueError: for an unknown name, preset or config key, or a bad value.

  Example:
    >>> from flax import nnx
    >>> model = create("nested-depth-mlp", rngs=nnx.Rngs(0), preset="digits")
    >>> type(model).__name__, model.num_exits
    ('NestedDepthNet', 4)
  """
  cls, _ = _MODELS[_check_name(name)]
  if not isinstance(rngs, nnx.Rngs):
    raise ValueError(
      f"rngs must be a flax.nnx.Rngs, got {type(rngs).__name__}; pass e.g."
      " rngs=nnx.Rngs(0)."
    )
  settings, backbone = _settings(name, preset, config)
  # The family classes take the backbone first (AnytimeNet itself does not).
  family = cast(Callable[..., AnytimeNet], cls)
  return family(backbone, rngs=rngs, **settings)
