"""Model zoo: branched and nested anytime networks in Flax NNX.

Four families from Wan et al. (ICML 2020), each with a ResNet-style conv
backbone (NHWC images: 32×32×3 CIFAR, 8×8×1 digits) and an MLP backbone
(feature vectors):

=====================  ====================================================
``branched``           a trunk of K stages, exit k a head on stage k
``nested-width``       every layer split in K channel groups; group k reads
                       groups 1..k of the layer below
``nested-depth``       interlaced: stage k+1 inserts a layer after each of
                       the ``D * 2**(k-1)`` layers so far (depth doubles)
``nested-width-depth`` both: each new interlaced chain is twice as wide
=====================  ====================================================

In every family exit k depends only on the parameters and computation of
stages 1..k. A model is an :class:`AnytimeNet` holding ``model.stages``, an
:class:`flax.nnx.List`: ``stages[k-1]`` owns all that stage k introduces,
head k included, and ``stages[k-1](carry) -> (new_carry, logits_k)`` with a
carry that is a plain pytree of arrays (documented per family module).
``model(x)`` returns the stacked logits ``(K, batch, classes)``;
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

    net = nnx.bridge.ToLinen(zoo.NestedDepthMLP,
                             kwargs=FrozenDict(stages=3, width=16))
    variables = net.init(jax.random.key(0), x)     # {'params', 'batch_stats'}
    logits, updates = net.apply(variables, x, mutable=["batch_stats"])
    first_two = net.apply(variables, x, upto=2, mutable=["batch_stats"])[0]
    # Inference with the running averages:
    logits = net.apply(variables, x, nnx_method="predict",
                       mutable=["batch_stats"])[0]
"""

from osgd_jax.zoo.base import AnytimeNet
from osgd_jax.zoo.blocks import (NORMS, Backbone, Head, ResidualLayer, Stem,
                                 conv_backbone, dense_backbone)
from osgd_jax.zoo.branched import (BranchedMLP, BranchedNet, BranchedResNet,
                                   BranchedStage)
from osgd_jax.zoo.functional import per_exit_loss_fn
from osgd_jax.zoo.nested_depth import (InterlacedNet, InterlacedStage,
                                       NestedDepthMLP, NestedDepthResNet)
from osgd_jax.zoo.nested_width import (NestedWidthMLP, NestedWidthNet,
                                       NestedWidthResNet, WidthStage)
from osgd_jax.zoo.nested_width_depth import (NestedWidthDepthMLP,
                                             NestedWidthDepthResNet)
from osgd_jax.zoo.registry import (config_keys, create, model_class, names,
                                   presets)

__all__ = [
    "AnytimeNet",
    "Backbone",
    "BranchedMLP",
    "BranchedNet",
    "BranchedResNet",
    "BranchedStage",
    "Head",
    "InterlacedNet",
    "InterlacedStage",
    "NORMS",
    "NestedDepthMLP",
    "NestedDepthResNet",
    "NestedWidthDepthMLP",
    "NestedWidthDepthResNet",
    "NestedWidthMLP",
    "NestedWidthNet",
    "NestedWidthResNet",
    "ResidualLayer",
    "Stem",
    "WidthStage",
    "config_keys",
    "conv_backbone",
    "create",
    "dense_backbone",
    "model_class",
    "names",
    "per_exit_loss_fn",
    "presets",
]
