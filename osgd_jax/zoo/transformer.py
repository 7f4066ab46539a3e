"""The transformer backbone: pre-norm attention blocks on token sequences.

:func:`transformer_backbone` builds a :class:`TransformerBackbone`, which
the four zoo families take like the convolutional and dense backbones. Its
"layer" is a pre-norm block (multi-head self-attention, then an MLP, each on
a residual stream; Xiong et al., 2020), its stem a tokenizer for one kind of
input, and its exit heads a final LayerNorm and a linear map:

=========  ==============================================  ===============
input      stem                                            one example
=========  ==============================================  ===============
image      non-overlapping ``patch``×``patch`` patches     ``(length,
           (ViT; Dosovitskiy et al., 2021)                 length, channels)``
signal     non-overlapping ``patch``-sample patches        ``(length,
           (MNIST-1D)                                      channels)``
tokens     an embedding of ``vocab`` discrete tokens       ``(length,)``
           (characters or bytes)                           int32
=========  ==============================================  ===============

Positions are learned (a parameter of the stem) or sinusoidal (Vaswani et
al., 2017; no parameter).

**Sequence outputs.** With ``causal=True`` attention is masked so that
position t reads positions 1..t only, and the heads do not pool: each exit
gives logits per position, and a model's stacked logits have shape ``(K,
batch, seq, classes)`` (a language model: ``classes`` is the vocabulary).
Everything per exit keeps its leading axis K: ``model(x, upto=k)`` returns
``(k, batch, seq, classes)``, the staged Jacobian differentiates a loss of
the stacked logits whatever their trailing axes, and FLOPs count every
position. Without ``causal`` the heads average over the tokens and the
logits are ``(K, batch, classes)`` as for every other backbone.

**Families.** ``branched`` continues one stream of blocks and exits after
each stage; ``nested-depth`` interlaces a new block after every existing one
(its lateral input projected and added to the block's input), so exit k has
``D * 2**(k-1)`` blocks; ``nested-width-depth`` does the same with chains
twice as wide each stage. ``nested-width`` is MatFormer's nesting (Devvrit et
al., 2023; :class:`MatFormerStage`): every block's attention heads and MLP
hidden units are split into K groups, and exit k is the transformer made of
groups 1..k of every block, so its parameters are a prefix of exit k+1's.

**A shared head** (``shared_head=True``, LayerSkip's early exits; Elhoushi
et al., 2024): one head (final LayerNorm and linear map) serves every exit.
The staged Jacobian needs every variable to belong to exactly one stage, so
the head belongs to stage 1, whose exit reads it first; stage 1 passes the
head's arrays on in its carry and later stages apply them (see
:class:`SharedHeadStage`). Exit k still depends on stages 1..k only, and the
head's gradient from exit k flows back to stage 1 through the carries. Only
families whose exits all read features of one width can share a head:
``branched-transformer`` and ``nested-depth-transformer``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from osgd_jax.zoo.blocks import (
  Backbone,
  Head,
  fan_in_init,
  group_widths,
  make_norm,
  require_int,
)

__all__ = [
  "INPUT_KINDS",
  "POSITIONS",
  "TransformerBackbone",
  "transformer_backbone",
  "TokenStem",
  "TransformerLayer",
  "TransformerHead",
  "FeatureTap",
  "SharedHeadStage",
  "MatFormerStage",
  "share_head",
]

#: What a transformer reads: image patches, signal patches, or tokens.
INPUT_KINDS = ("image", "signal", "tokens")
#: Position encodings: a learned table, or fixed sines and cosines.
POSITIONS = ("learned", "sinusoidal")
# Norms that act on each position alone; a causal model may use only these
# (BatchNorm and GroupNorm pool statistics over positions, the future ones
# included).
_PER_POSITION_NORMS = ("layer", "none")
_EPS = 1e-6

lecun_normal = fan_in_init(1.0)


@dataclasses.dataclass(frozen=True)
class TransformerBackbone(Backbone):
  """A :class:`~osgd_jax.zoo.blocks.Backbone` of pre-norm attention blocks.

  Build it with :func:`transformer_backbone`, which documents the fields.
  ``in_features`` is the channels of images and signals, or the vocabulary
  size of tokens.
  """

  input_kind: str = "tokens"
  length: int = 1
  patch: int = 1
  heads: int = 1
  mlp_ratio: int = 2
  positions: str = "learned"
  causal: bool = False
  shared_head: bool = False

  @property
  def num_tokens(self) -> int:
    """The sequence length the blocks see (patches per example, or tokens)."""
    if self.input_kind == "image":
      return (self.length // self.patch) ** 2
    return self.length // self.patch

  @property
  def spatial_axes(self) -> tuple[int, ...]:
    """The token axis, which the heads pool (none for a causal model)."""
    return () if self.causal else (1,)

  def example_shape(self) -> tuple[tuple[int, ...], Any]:
    """The shape and dtype of one example (no batch axis)."""
    if self.input_kind == "image":
      return (self.length, self.length, self.in_features), jnp.float32
    if self.input_kind == "signal":
      return (self.length, self.in_features), jnp.float32
    return (self.length,), jnp.int32

  def prepare(self, x: jax.Array) -> jax.Array:
    """Validates a batch of inputs: images, signals or token ids."""
    x = jnp.asarray(x)
    shape, _ = self.example_shape()
    if self.input_kind == "tokens":
      # Floating inputs hold token ids too (e.g. abstract FLOPs counting).
      if x.ndim != 2 or not 1 <= x.shape[1] <= self.length:
        raise ValueError(
          f"This transformer expects a batch of token ids of shape (batch,"
          f" seq) with seq <= {self.length}, got shape {tuple(x.shape)}."
          " Cut the text into windows of at most that many tokens, or build"
          " the model with a larger length."
        )
      return x.astype(jnp.int32)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(jnp.float32)
    if x.ndim == len(shape) and self.in_features == 1:
      x = x[..., None]  # one channel given without its axis
    if tuple(x.shape[1:]) != shape:
      what = "images" if self.input_kind == "image" else "signals"
      raise ValueError(
        f"This transformer expects a batch of {what} of shape (batch,"
        f" {', '.join(map(str, shape))}), got shape {tuple(x.shape)}."
        f" Reshape the input, or build the model with length and channels"
        " that match it."
      )
    return x

  def stem(self, out_features: int, *, norm: str, rngs: nnx.Rngs) -> nnx.Module:
    """The tokenizer: patches or embeddings, plus positions."""
    self.check_norm(norm)
    return TokenStem(self, out_features, rngs=rngs)

  def check_norm(self, norm: str) -> None:
    """Refuses a norm that would let a causal model read future positions."""
    if self.causal and norm not in _PER_POSITION_NORMS:
      raise ValueError(
        f"norm={norm!r} pools statistics over positions, so a causal"
        " transformer's outputs would read future tokens; use norm='layer'"
        " (or 'none')."
      )

  def layer(
    self,
    in_features: Sequence[int],
    out_features: int,
    *,
    strides: Sequence[int] | None = None,
    norm: str,
    rngs: nnx.Rngs,
  ) -> nnx.Module:
    """A pre-norm block; inputs after the first are projected and added."""
    del strides  # tokens are never downsampled
    return TransformerLayer(
      self, in_features, out_features, norm=norm, rngs=rngs
    )

  def head(
    self, in_features: int, num_classes: int, *, rngs: nnx.Rngs
  ) -> nnx.Module:
    """Final LayerNorm and linear map; a parameter-free tap if shared."""
    if self.shared_head:
      return FeatureTap(in_features)
    return TransformerHead(self, in_features, num_classes, rngs=rngs)


def transformer_backbone(
  input_kind: str = "tokens",
  length: int = 128,
  channels: int = 1,
  patch: int = 1,
  vocab: int = 256,
  heads: int = 2,
  mlp_ratio: int = 2,
  positions: str = "learned",
  causal: bool = False,
  shared_head: bool = False,
) -> TransformerBackbone:
  """The transformer backbone: a tokenizer stem and pre-norm blocks.

  The model width (``width`` of the family) is split over ``heads``
  attention heads, so it must be a multiple of ``heads``.

  Args:
    input_kind: ``"image"`` (square images, ViT patches), ``"signal"`` (1-D
      signals, patches of samples) or ``"tokens"`` (int token ids).
    length: image side, signal samples, or the longest token sequence.
    channels: channels of images and signals (ignored for tokens).
    patch: patch side (images) or samples per patch (signals); must divide
      ``length``; 1 for tokens.
    vocab: number of distinct tokens (tokens only; 256 for bytes).
    heads: attention heads of every block (of exit 1's blocks for the
      width-nested family, which doubles them per exit).
    mlp_ratio: MLP hidden units per model feature.
    positions: ``"learned"`` or ``"sinusoidal"``.
    causal: mask attention to earlier positions and give logits per
      position (language modelling).
    shared_head: one head for every exit, owned by stage 1 (LayerSkip).

  Returns:
    The :class:`TransformerBackbone` to pass to a zoo family.

  Raises:
    ValueError: for an unknown kind or position encoding, a non-positive
      size, or a patch that does not divide the length.

  Example:
    >>> vit = transformer_backbone("image", length=8, patch=2)
    >>> vit.num_tokens, vit.example_shape()[0]
    (16, (8, 8, 1))
    >>> lm = transformer_backbone("tokens", length=64, causal=True)
    >>> lm.example_shape()
    ((64,), <class 'jax.numpy.int32'>)
  """
  if input_kind not in INPUT_KINDS:
    raise ValueError(
      f"Unknown input_kind {input_kind!r}; choose one of {INPUT_KINDS}."
    )
  if positions not in POSITIONS:
    raise ValueError(
      f"Unknown positions {positions!r}; choose one of {POSITIONS}."
    )
  for name, value in dict(
    length=length,
    channels=channels,
    patch=patch,
    vocab=vocab,
    heads=heads,
    mlp_ratio=mlp_ratio,
  ).items():
    require_int(name, value, 1)
  for name, value in dict(causal=causal, shared_head=shared_head).items():
    if not isinstance(value, bool):
      raise ValueError(f"{name} must be True or False, got {value!r}.")
  if input_kind == "tokens" and patch != 1:
    raise ValueError(f"Tokens are not patched, got patch={patch}; use patch=1.")
  if length % patch:
    raise ValueError(
      f"patch={patch} does not divide length={length}; choose a patch size"
      f" that divides it (e.g. {math.gcd(length, patch) or 1})."
    )
  return TransformerBackbone(
    "transformer",
    vocab if input_kind == "tokens" else channels,
    0,
    input_kind=input_kind,
    length=length,
    patch=patch,
    heads=heads,
    mlp_ratio=mlp_ratio,
    positions=positions,
    causal=causal,
    shared_head=shared_head,
  )


def _sinusoids(num: int, features: int) -> np.ndarray:
  """Sine and cosine position codes of Vaswani et al. (2017), (num, feat)."""
  pos = np.arange(num)[:, None]
  freq = np.exp(-np.log(10000.0) * (np.arange(features) // 2 * 2) / features)
  angle = pos * freq[None, :]
  return np.where(np.arange(features) % 2 == 0, np.sin(angle), np.cos(angle))


class TokenStem(nnx.Module):
  """Input to a ``(batch, seq, out_features)`` sequence, positions added.

  Args:
    backbone: the :class:`TransformerBackbone`.
    out_features: the model width.
    rngs: the random generators.

  Example:
    >>> stem = TokenStem(transformer_backbone("signal", length=40, patch=4),
    ...                  8, rngs=nnx.Rngs(0))
    >>> stem(jnp.ones((2, 40, 1))).shape
    (2, 10, 8)
  """

  def __init__(
    self, backbone: TransformerBackbone, out_features: int, *, rngs: nnx.Rngs
  ):
    self.backbone = backbone
    kind, p = backbone.input_kind, backbone.patch
    if kind == "tokens":
      self.embed = nnx.Embed(
        backbone.in_features,
        out_features,
        embedding_init=nnx.initializers.normal(1.0),
        rngs=rngs,
      )
    else:
      rank = 2 if kind == "image" else 1
      self.embed = nnx.Conv(
        backbone.in_features,
        out_features,
        kernel_size=(p,) * rank,
        strides=(p,) * rank,
        padding="VALID",
        kernel_init=lecun_normal,
        rngs=rngs,
      )
    n = backbone.num_tokens
    if backbone.positions == "learned":
      self.positions = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (n, out_features))
      )
    else:
      self.positions = None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.embed(x)
    h = h.reshape(h.shape[0], -1, h.shape[-1])
    t = h.shape[1]
    if self.positions is None:  # a constant of the program, no variable
      table = jnp.asarray(_sinusoids(t, h.shape[-1]), h.dtype)
    else:
      table = self.positions[...][:t].astype(h.dtype)
    return h + table


def _value(variable: Any) -> jax.Array:
  """The array of an ``nnx.Variable`` (a bias that may be ``None``)."""
  return variable[...]


def _layer_norm(h: jax.Array, scale: Any, bias: Any) -> jax.Array:
  """LayerNorm over the last axis (``scale``/``bias`` ``None``: plain)."""
  mean = h.mean(-1, keepdims=True)
  var = jnp.square(h - mean).mean(-1, keepdims=True)
  out = (h - mean) * jax.lax.rsqrt(var + _EPS)
  if scale is not None:
    out = out * scale + bias
  return out


def _attention(
  h: jax.Array,
  wq: jax.Array,
  wk: jax.Array,
  wv: jax.Array,
  wo: jax.Array,
  *,
  head_dim: int,
  causal: bool,
) -> jax.Array:
  """Multi-head self-attention of ``h`` (batch, seq, d) with given weights.

  ``wq``, ``wk``, ``wv``: ``(d, heads * head_dim)``; ``wo``: ``(heads *
  head_dim, d)`` (no bias: the caller adds it).
  """
  b, t, _ = h.shape

  def split(w):
    return (h @ w).reshape(b, t, -1, head_dim)

  q, k, v = split(wq), split(wk), split(wv)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
  if causal:
    mask = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
  weights = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, -1)
  return out @ wo


def _head_dim(backbone: TransformerBackbone, width: int) -> int:
  if width % backbone.heads:
    raise ValueError(
      f"A transformer block of width {width} cannot be split into"
      f" {backbone.heads} attention heads; use a width that is a multiple"
      f" of heads={backbone.heads}."
    )
  return width // backbone.heads


class TransformerLayer(nnx.Module):
  """A pre-norm transformer block reading several inputs.

  The block input is the first input (projected when its width differs)
  plus a projection of every further input (the interlaced families'
  lateral inputs); then ``h += attention(norm(h))`` and ``h +=
  mlp(norm(h))``.

  Args:
    backbone: the :class:`TransformerBackbone`.
    in_features: widths of the inputs.
    out_features: the block's width.
    norm: one of :data:`~osgd_jax.zoo.blocks.NORMS` (``layer`` usually).
    rngs: the random generators.

  Example:
    >>> layer = TransformerLayer(transformer_backbone(), (8, 4), 8,
    ...                          norm="layer", rngs=nnx.Rngs(0))
    >>> layer([jnp.ones((2, 5, 8)), jnp.ones((2, 5, 4))]).shape
    (2, 5, 8)
  """

  def __init__(
    self,
    backbone: TransformerBackbone,
    in_features: Sequence[int],
    out_features: int,
    *,
    norm: str,
    rngs: nnx.Rngs,
  ):
    backbone.check_norm(norm)
    self.head_dim = _head_dim(backbone, out_features)
    self.causal = backbone.causal

    def dense(i, o, bias=False):
      return nnx.Linear(
        i, o, use_bias=bias, kernel_init=lecun_normal, rngs=rngs
      )

    first = in_features[0]
    self.skip = None if first == out_features else dense(first, out_features)
    self.inputs = nnx.List([dense(f, out_features) for f in in_features[1:]])
    self.norm1 = make_norm(norm, out_features, rngs=rngs)
    self.query = dense(out_features, out_features)
    self.key = dense(out_features, out_features)
    self.value = dense(out_features, out_features)
    self.out = dense(out_features, out_features, bias=True)
    self.norm2 = make_norm(norm, out_features, rngs=rngs)
    hidden = backbone.mlp_ratio * out_features
    self.mlp_in = dense(out_features, hidden, bias=True)
    self.mlp_out = dense(hidden, out_features, bias=True)

  def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
    h = inputs[0] if self.skip is None else self.skip(inputs[0])
    for lin, x in zip(self.inputs, inputs[1:], strict=True):
      h = h + lin(x)
    a = h if self.norm1 is None else self.norm1(h)
    h = (
      h
      + _value(self.out.bias)
      + _attention(
        a,
        self.query.kernel[...],
        self.key.kernel[...],
        self.value.kernel[...],
        self.out.kernel[...],
        head_dim=self.head_dim,
        causal=self.causal,
      )
    )
    m = h if self.norm2 is None else self.norm2(h)
    return h + self.mlp_out(jax.nn.gelu(self.mlp_in(m)))


class TransformerHead(Head):
  """Exit head: LayerNorm, mean over tokens (not if causal), linear map.

  Example:
    >>> head = TransformerHead(transformer_backbone(causal=True), 8, 256,
    ...                        rngs=nnx.Rngs(0))
    >>> head(jnp.ones((2, 5, 8))).shape
    (2, 5, 256)
  """

  def __init__(
    self,
    backbone: Backbone,
    in_features: int,
    num_classes: int,
    *,
    rngs: nnx.Rngs,
  ):
    super().__init__(backbone, in_features, num_classes, rngs=rngs)
    self.norm = nnx.LayerNorm(in_features, epsilon=_EPS, rngs=rngs)

  def arrays(self) -> dict[str, jax.Array]:
    """The head's parameters as plain arrays (for a shared head's carry)."""
    return {
      "scale": _value(self.norm.scale),
      "bias": _value(self.norm.bias),
      "kernel": _value(self.linear.kernel),
      "out_bias": _value(self.linear.bias),
    }

  def __call__(self, h: jax.Array) -> jax.Array:
    return apply_head(self.arrays(), self.backbone, h)


def apply_head(
  arrays: dict[str, jax.Array], backbone: Backbone, h: jax.Array
) -> jax.Array:
  """A :class:`TransformerHead` as a function of its arrays."""
  h = _layer_norm(h, arrays["scale"], arrays["bias"])
  h = backbone.pool(h)
  return h @ arrays["kernel"] + arrays["out_bias"]


class FeatureTap(nnx.Module):
  """A parameter-free stand-in for a stage's head: returns the features.

  A stage with a shared head (see :class:`SharedHeadStage`) ends in this.
  """

  def __init__(self, in_features: int):
    self.in_features = in_features

  def __call__(self, h: jax.Array) -> jax.Array:
    return h


class SharedHeadStage(nnx.Module):
  """A stage whose exit uses the head that stage 1 owns (LayerSkip).

  ``inner`` is a family's stage ending in a :class:`FeatureTap`. Stage 1
  owns ``head`` (a :class:`TransformerHead`) and puts its arrays in the
  carry; a later stage (``head=None``) applies the arrays it receives. So
  every variable belongs to one stage, as the staged Jacobian needs, and the
  shared head's gradient from exit k reaches stage 1 through the carries.

  Carry: stage 1 takes the inner stage's input; every stage returns
  ``{"inner": inner carry, "head": the shared head's arrays}``.

  Args:
    inner: the family's stage, with a :class:`FeatureTap` as its head.
    head: the shared head (stage 1), or ``None`` (later stages).
    backbone: the backbone (it says whether the head pools).
  """

  def __init__(
    self,
    inner: Any,
    head: TransformerHead | None,
    backbone: TransformerBackbone,
  ):
    self.inner = inner
    self.head = head
    self.backbone = backbone
    self.depth = inner.depth

  def __call__(self, carry: Any) -> tuple[dict[str, Any], jax.Array]:
    if self.head is not None:
      inner, arrays = carry, self.head.arrays()
    else:
      inner, arrays = carry["inner"], carry["head"]
    new_inner, features = self.inner(inner)
    logits = apply_head(arrays, self.backbone, features)
    return {"inner": new_inner, "head": arrays}, logits


def share_head(
  stages: Sequence[Any],
  backbone: TransformerBackbone,
  num_classes: int,
  *,
  family: str,
  rngs: nnx.Rngs,
) -> list[nnx.Module]:
  """Wraps a family's stages so that all exits share stage 1's head.

  Args:
    stages: the stages, each with a :class:`FeatureTap` head.
    backbone: the backbone (``shared_head=True``).
    num_classes: classes of the shared head.
    family: the family's name, for the message.
    rngs: the random generators.

  Returns:
    The :class:`SharedHeadStage` wrappers, stage 1 owning the head.

  Raises:
    ValueError: if the exits read features of different widths.
  """
  widths = [stage.head.in_features for stage in stages]
  if len(set(widths)) != 1:
    raise ValueError(
      f"{family}'s exits read features of widths {widths}, so one head"
      " cannot serve them all; use shared_head=False, or the"
      " branched-transformer or nested-depth-transformer model."
    )
  head = TransformerHead(backbone, widths[0], num_classes, rngs=rngs)
  return [
    SharedHeadStage(stage, head if k == 0 else None, backbone)
    for k, stage in enumerate(stages)
  ]


class _MatSlice(nnx.Module):
  """One stage's group of a block: some attention heads and MLP units."""

  def __init__(
    self, width: int, heads: int, head_dim: int, hidden: int, rngs: nnx.Rngs
  ):
    inner = heads * head_dim

    def param(*shape):
      # Fan-in of the group, not of the whole block: exit 1's stack is
      # then initialised like a plain transformer of its size.
      return nnx.Param(lecun_normal(rngs.params(), shape))

    self.query = param(width, inner)
    self.key = param(width, inner)
    self.value = param(width, inner)
    self.out = param(inner, width)
    self.mlp_in = param(width, hidden)
    self.mlp_in_bias = nnx.Param(jnp.zeros((hidden,)))
    self.mlp_out = param(hidden, width)

  def arrays(self) -> dict[str, jax.Array]:
    return {
      name: getattr(self, name)[...]
      for name in (
        "query",
        "key",
        "value",
        "out",
        "mlp_in",
        "mlp_in_bias",
        "mlp_out",
      )
    }


class _MatShared(nnx.Module):
  """What every exit of a block shares: norms and output biases."""

  def __init__(self, width: int, norm: str):
    self.norm = norm == "layer"
    if self.norm:
      self.scale1 = nnx.Param(jnp.ones((width,)))
      self.bias1 = nnx.Param(jnp.zeros((width,)))
      self.scale2 = nnx.Param(jnp.ones((width,)))
      self.bias2 = nnx.Param(jnp.zeros((width,)))
    self.out_bias = nnx.Param(jnp.zeros((width,)))
    self.mlp_out_bias = nnx.Param(jnp.zeros((width,)))

  def arrays(self) -> dict[str, jax.Array]:
    names = ["out_bias", "mlp_out_bias"]
    if self.norm:
      names += ["scale1", "bias1", "scale2", "bias2"]
    return {name: getattr(self, name)[...] for name in names}


class MatFormerStage(nnx.Module):
  """Stage k of a MatFormer-nested transformer: group k of every block.

  Every block's attention heads and MLP hidden units are split into K
  groups of sizes ``(n, n, 2n, 4n, ...)`` (the total doubles per exit;
  ``n`` is ``heads`` heads, or ``mlp_ratio * width`` units). Stage k owns
  group k of every block and head k; stage 1 also owns the stem, the norms
  and the output biases, which every exit shares. Exit k runs the whole
  stack with groups 1..k: a complete transformer of width ``width`` whose
  parameters are a prefix of exit k+1's (MatFormer; Devvrit et al., 2023).
  Exit k+1 cannot reuse exit k's activations (its groups change the
  residual stream that every later group reads), so stage k passes the
  arrays of groups 1..k on in its carry, and stage k+1 reruns the stack.

  Carry: stage 1 takes the input batch. Stage k returns ``{"embedded": the
  stem's output, "shared": stage 1's shared arrays, "groups": (groups of
  stage 1, ..., of stage k)}``, each group a tuple over blocks of dicts of
  arrays.

  Args:
    backbone: the :class:`TransformerBackbone`.
    width: the model width ``d`` (every exit's).
    index: this stage's 0-based index, k-1.
    stages: the number of stages K.
    depth: the number of blocks.
    num_classes: classes of the exit head.
    norm: ``layer`` or ``none``.
    rngs: the random generators.
  """

  def __init__(
    self,
    backbone: TransformerBackbone,
    *,
    width: int,
    index: int,
    stages: int,
    depth: int,
    num_classes: int,
    norm: str,
    rngs: nnx.Rngs,
  ):
    if norm not in _PER_POSITION_NORMS:
      raise ValueError(
        f"The width-nested transformer shares its norms between exits and"
        f" supports norm='layer' or 'none', got {norm!r}; use norm='layer'."
      )
    if backbone.shared_head:
      raise ValueError(
        "The width-nested transformer gives each exit its own head; use"
        " shared_head=False, or the branched-transformer or"
        " nested-depth-transformer model."
      )
    head_dim = _head_dim(backbone, width)
    heads = group_widths(backbone.heads, stages)[index]
    hidden = group_widths(backbone.mlp_ratio * width, stages)[index]
    self.first = index == 0
    self.depth = depth if self.first else 0
    self.head_dim, self.causal = head_dim, backbone.causal
    if self.first:
      self.stem = TokenStem(backbone, width, rngs=rngs)
      self.shared = nnx.List([_MatShared(width, norm) for _ in range(depth)])
    else:
      self.stem, self.shared = None, None
    self.layers = nnx.List(
      [_MatSlice(width, heads, head_dim, hidden, rngs) for _ in range(depth)]
    )
    self.head = TransformerHead(backbone, width, num_classes, rngs=rngs)

  def __call__(self, carry: Any) -> tuple[dict[str, Any], jax.Array]:
    own = tuple(layer.arrays() for layer in self.layers)
    if self.first:
      assert self.stem is not None and self.shared is not None
      embedded = self.stem(carry)
      shared = tuple(s.arrays() for s in self.shared)
      groups = (own,)
    else:
      embedded, shared = carry["embedded"], carry["shared"]
      groups = (*carry["groups"], own)
    h = embedded
    for block, common in enumerate(shared):
      w = {
        name: jnp.concatenate(
          [g[block][name] for g in groups],
          axis=0 if name in ("out", "mlp_out") else -1,
        )
        for name in own[block]
      }
      a = (
        _layer_norm(h, common["scale1"], common["bias1"])
        if "scale1" in common
        else h
      )
      h = (
        h
        + common["out_bias"]
        + _attention(
          a,
          w["query"],
          w["key"],
          w["value"],
          w["out"],
          head_dim=self.head_dim,
          causal=self.causal,
        )
      )
      m = (
        _layer_norm(h, common["scale2"], common["bias2"])
        if "scale2" in common
        else h
      )
      hidden = jax.nn.gelu(m @ w["mlp_in"] + w["mlp_in_bias"])
      h = h + hidden @ w["mlp_out"] + common["mlp_out_bias"]
    new = {"embedded": embedded, "shared": shared, "groups": groups}
    return new, self.head(h)
