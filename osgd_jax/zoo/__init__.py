"""Model zoo: branched and nested anytime networks in Flax NNX.

Four families from Wan et al. (ICML 2020), each a class that takes a
backbone: :func:`conv_backbone` (a ResNet-style network on NHWC images:
32×32×3 CIFAR, 8×8×1 digits), :func:`conv1d_backbone` (the same with one
spatial axis, on 1-D signals such as MNIST-1D's), :func:`dense_backbone`
(an MLP on feature vectors) or :func:`transformer_backbone` (pre-norm
attention blocks on image patches, signal patches or discrete tokens;
causal for language models):

=============================  ============================================
:class:`BranchedNet`           a trunk of K stages, exit k a head on stage k
:class:`NestedWidthNet`        every layer split in K channel groups; group
                               k reads groups 1..k of the layer below (on
                               transformers, MatFormer's nesting of heads
                               and MLP units: :class:`MatFormerStage`)
:class:`NestedDepthNet`        interlaced: stage k+1 inserts a layer after
                               each of the ``D * 2**(k-1)`` layers so far
                               (depth doubles)
:class:`NestedWidthDepthNet`   both: each new interlaced chain is twice as
                               wide
=============================  ============================================

Build one directly, e.g. ``NestedDepthNet(conv_backbone(in_channels=3,
downsamples=2), stages=4, width=16, depth=3, rngs=nnx.Rngs(0))``, or by
name, with presets, through :func:`create`: names are
``<family>-<backbone>`` with family ``branched``, ``nested-width``,
``nested-depth`` or ``nested-width-depth`` (the classes above, in order)
and backbone ``resnet`` (:func:`conv_backbone`), ``conv1d``
(:func:`conv1d_backbone`), ``mlp`` (:func:`dense_backbone`) or
``transformer`` (:func:`transformer_backbone`). :func:`input_spec` gives
one example's shape and dtype for any name and preset. A transformer with
``shared_head=True`` gives every exit one head, as LayerSkip does
(:class:`SharedHeadStage`); a causal one gives logits per position,
stacked ``(K, batch, seq, classes)``.

In every family exit k depends only on the parameters and computation of
stages 1..k. A model is an :class:`AnytimeNet` holding ``model.stages``, an
:class:`flax.nnx.List`: ``stages[k-1]`` owns all that stage k introduces,
head k included, and ``stages[k-1](carry) -> (new_carry, logits_k)`` with a
carry that is a plain pytree of arrays (documented per family class).
``model(x)`` returns the stacked logits ``(K, batch, classes)`` (causal
transformers: ``(K, batch, seq, classes)``);
``model(x, upto=k)`` runs stages 1..k only and returns ``(k, batch,
classes)``. Anytime inference by hand::

    carry = model.input_carry(x)
    for stage in model.stages:
      carry, logits = stage(carry)   # stop whenever the budget runs out

Models are created in train mode (BatchNorm uses and updates batch
statistics); ``model.eval()`` switches BatchNorm to the running averages.

Example: per-exit gradients for OSGD, BatchNorm statistics included::

    import jax
    from flax import nnx
    import osgd_jax
    from osgd_jax import zoo

    model = zoo.create("nested-width-resnet", rngs=nnx.Rngs(0),
                       preset="digits")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads_fn = osgd_jax.value_and_per_exit_grads(
        zoo.per_exit_loss_fn(graphdef), has_aux=True)

    @jax.jit
    def step(params, rest, x, y):
      (losses, rest), grads = grads_fn(params, rest, x, y)
      return losses, rest, grads   # grads leaves: (K, *param.shape)

    losses, rest, grads = step(params, rest, x, y)   # x: (B, 8, 8, 1)
    nnx.update(model, rest)

Example: a Linen user wraps a zoo model with ``flax.nnx.bridge.ToLinen``::

    from flax.core import FrozenDict

    net = nnx.bridge.ToLinen(
        zoo.NestedDepthNet, args=(zoo.dense_backbone(in_features=64),),
        kwargs=FrozenDict(stages=3, width=16, depth=1))
    variables = net.init(jax.random.key(0), x)     # {'params', 'batch_stats'}
    logits, updates = net.apply(variables, x, mutable=["batch_stats"])
    first_two = net.apply(variables, x, upto=2, mutable=["batch_stats"])[0]
    # Inference with the running averages:
    logits = net.apply(variables, x, nnx_method="predict",
                       mutable=["batch_stats"])[0]
"""

from osgd_jax.zoo.base import MAX_LAYERS, MAX_WIDTH, AnytimeNet
from osgd_jax.zoo.blocks import (
  NORMS,
  Backbone,
  Head,
  ResidualLayer,
  Stem,
  conv1d_backbone,
  conv_backbone,
  dense_backbone,
)
from osgd_jax.zoo.branched import BranchedNet, BranchedStage
from osgd_jax.zoo.functional import per_exit_loss_fn
from osgd_jax.zoo.nested_depth import InterlacedStage, NestedDepthNet
from osgd_jax.zoo.nested_width import NestedWidthNet, WidthStage
from osgd_jax.zoo.nested_width_depth import NestedWidthDepthNet
from osgd_jax.zoo.registry import (
  PRESET_INPUTS,
  config_keys,
  create,
  default_preset,
  input_spec,
  model_class,
  names,
  presets,
)
from osgd_jax.zoo.transformer import (
  MatFormerStage,
  SharedHeadStage,
  TransformerBackbone,
  transformer_backbone,
)

__all__ = [
  "AnytimeNet",
  "MAX_LAYERS",
  "MAX_WIDTH",
  "Backbone",
  "BranchedNet",
  "BranchedStage",
  "Head",
  "InterlacedStage",
  "MatFormerStage",
  "NORMS",
  "NestedDepthNet",
  "NestedWidthDepthNet",
  "NestedWidthNet",
  "PRESET_INPUTS",
  "ResidualLayer",
  "SharedHeadStage",
  "Stem",
  "TransformerBackbone",
  "WidthStage",
  "config_keys",
  "conv1d_backbone",
  "conv_backbone",
  "create",
  "default_preset",
  "dense_backbone",
  "input_spec",
  "model_class",
  "names",
  "per_exit_loss_fn",
  "presets",
  "transformer_backbone",
]
