"""Registry, presets, configuration errors, input checks and determinism."""

from __future__ import annotations

import functools
import time

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from osgd_jax import anytime, zoo

OLD_NAMES = (
  "branched-mlp",
  "branched-resnet",
  "nested-depth-mlp",
  "nested-depth-resnet",
  "nested-width-depth-mlp",
  "nested-width-depth-resnet",
  "nested-width-mlp",
  "nested-width-resnet",
)
BACKBONES = ("conv1d", "mlp", "resnet", "transformer")
NAMES = tuple(
  sorted(
    f"{family}-{backbone}"
    for family in ("branched", "nested-width", "nested-depth")
    + ("nested-width-depth",)
    for backbone in BACKBONES
  )
)
TRANSFORMER_KEYS = (
  "input_kind",
  "length",
  "channels",
  "patch",
  "vocab",
  "heads",
  "mlp_ratio",
  "positions",
  "causal",
  "shared_head",
)
# The presets of each backbone, and the one create(name) starts from.
PRESETS = {
  "resnet": ({"cifar", "digits"}, "cifar"),
  "mlp": ({"cifar", "digits", "mnist1d"}, "digits"),
  "conv1d": ({"mnist1d"}, "mnist1d"),
  "transformer": (
    {"cifar", "digits", "mnist1d", "text", "text-small"},
    "digits",
  ),
}
FAMILIES = {
  "branched": zoo.BranchedNet,
  "nested-width": zoo.NestedWidthNet,
  "nested-depth": zoo.NestedDepthNet,
  "nested-width-depth": zoo.NestedWidthDepthNet,
}
FAMILY_KEYS = ("stages", "width", "depth", "num_classes", "norm")
# The defaults of the eight per-backbone constructors that the four family
# classes replaced: `create(name)` without a preset must keep building them.
OLD_DEFAULTS = {
  "branched-resnet": dict(width=16, depth=2),
  "nested-width-resnet": dict(width=8, depth=3),
  "nested-depth-resnet": dict(width=16, depth=3),
  "nested-width-depth-resnet": dict(width=8, depth=3),
  "branched-mlp": dict(width=64, depth=1),
  "nested-width-mlp": dict(width=16, depth=2),
  "nested-depth-mlp": dict(width=64, depth=1),
  "nested-width-depth-mlp": dict(width=16, depth=1),
}


def abstract(name: str, **config) -> zoo.AnytimeNet:
  """The model with shapes only: no parameter is computed."""
  return nnx.eval_shape(lambda: zoo.create(name, rngs=nnx.Rngs(0), **config))


def default_preset(name: str) -> str:
  return PRESETS[name.rsplit("-", 1)[1]][1]


@functools.cache
def preset_model(name: str, preset: str) -> zoo.AnytimeNet:
  if preset == default_preset(name):
    # The default config is this preset (checked below): build it with no
    # config at all, so that the tests cover `create(name, rngs=...)`.
    return abstract(name)
  return abstract(name, preset=preset)


def output_shape(model: zoo.AnytimeNet, x) -> tuple[int, ...]:
  """The shape of ``model.predict(x)`` (stacked exits), without computing."""
  graphdef, state = nnx.split(model)
  # predict: tracing BatchNorm's statistic updates is slow in flax 0.12.
  return jax.eval_shape(
    lambda s, x: nnx.merge(graphdef, s).predict(x), state, x
  ).shape


# One example of each preset's data, as the data sets give it (the MLPs
# flatten it); text: 128 byte ids, text-small 64.
DATA = {
  "cifar": ((32, 32, 3), jnp.float32),
  "digits": ((8, 8, 1), jnp.float32),
  "mnist1d": ((40, 1), jnp.float32),
  "text": ((128,), jnp.int32),
  "text-small": ((64,), jnp.int32),
}


def test_input_spec_of_every_name_and_preset():
  for name in NAMES:
    assert zoo.input_spec(name) == zoo.input_spec(name, default_preset(name))
    for preset in zoo.presets(name):
      spec = zoo.input_spec(name, preset)
      assert isinstance(spec, jax.ShapeDtypeStruct)
      shape, dtype = DATA[preset]
      if name.endswith("-mlp"):  # a flat vector of the data's values
        shape = (int(np.prod(shape)),)
      assert (spec.shape, spec.dtype) == (shape, dtype), (name, preset)
  # The overrides create() takes change the spec alike.
  assert zoo.input_spec("branched-resnet", in_channels=1).shape == (32, 32, 1)
  assert zoo.input_spec("branched-mlp", in_features=7).shape == (7,)
  spec = zoo.input_spec("nested-depth-transformer", "text", length=9)
  assert spec.shape == (9,) and spec.dtype == jnp.int32
  with pytest.raises(ValueError, match="Unknown preset 'text'"):
    zoo.input_spec("branched-conv1d", "text")


def test_names_lists_every_family_and_backbone():
  assert zoo.names() == NAMES
  for family, cls in FAMILIES.items():
    conv, dense = f"{family}-resnet", f"{family}-mlp"
    for backbone in BACKBONES:
      assert zoo.model_class(f"{family}-{backbone}") is cls
    assert issubclass(cls, zoo.AnytimeNet)
    assert zoo.config_keys(conv) == FAMILY_KEYS + ("in_channels", "downsamples")
    assert zoo.config_keys(f"{family}-conv1d") == zoo.config_keys(conv)
    assert zoo.config_keys(dense) == FAMILY_KEYS + ("in_features",)
    assert zoo.config_keys(f"{family}-transformer") == (
      FAMILY_KEYS + TRANSFORMER_KEYS
    )


@pytest.mark.parametrize("name", OLD_NAMES)
def test_default_config_is_the_old_constructor_defaults(name):
  # Built directly from the family class with the old defaults: the same
  # graph (module types, widths, strides, backbone) and the same shapes.
  conv = name.endswith("resnet")
  backbone = (
    zoo.conv_backbone(in_channels=3, downsamples=2)
    if conv
    else zoo.dense_backbone(in_features=64)
  )
  family = name.removesuffix("-resnet").removesuffix("-mlp")
  expected = nnx.eval_shape(
    lambda: FAMILIES[family](
      backbone,
      stages=4,
      num_classes=10,
      norm="batch",
      rngs=nnx.Rngs(0),
      **OLD_DEFAULTS[name],
    )
  )
  model = preset_model(name, default_preset(name))  # create(name, rngs=...)
  assert type(model) is FAMILIES[family]
  assert model.backbone == backbone
  assert nnx.graphdef(model) == nnx.graphdef(expected)

  def shapes(m):
    return jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(m))

  assert shapes(model) == shapes(expected)
  # And the defaults are this preset.
  assert zoo.presets(name)[default_preset(name)] == dict(
    OLD_DEFAULTS[name],
    stages=4,
    num_classes=10,
    **(dict(in_channels=3, downsamples=2) if conv else dict(in_features=64)),
  )


def exit_dependencies(exits, params, *args) -> tuple[list, np.ndarray]:
  """Which stages' parameters each exit's logits read, from the dataflow.

  Traces ``exits(params, *args) -> [logits_1, ..., logits_K]`` (no
  compilation) and follows its jaxpr: an equation's outputs depend on every
  input it reads, so ``depends[k, j] == False`` proves that exit k+1 reads
  no parameter of stage j+1.

  Args:
    exits: the function to trace.
    params: ``{"stages": {j: parameters of stage j+1}}`` (an ``nnx.State``
      of a zoo model has this layout).
    *args: the other arguments of ``exits`` (arrays or shapes).

  Returns:
    The exits' output avals and the ``(K, K)`` boolean dependency matrix.
  """
  closed = jax.make_jaxpr(exits)(params, *args)
  stage_of = [
    path[1].key for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  num_stages = len(params["stages"])
  depends = np.zeros((len(closed.jaxpr.outvars), num_stages), bool)

  def read(v, tainted):
    return not isinstance(v, jex.core.Literal) and (v in tainted)

  for j in range(num_stages):
    # The jaxpr's inputs are the parameters' leaves, then the inputs.
    tainted = {
      v for v, s in zip(closed.jaxpr.invars, stage_of, strict=False) if s == j
    }
    for eqn in closed.jaxpr.eqns:
      if any(read(v, tainted) for v in eqn.invars):
        tainted.update(eqn.outvars)
    depends[:, j] = [read(v, tainted) for v in closed.jaxpr.outvars]
  return closed.out_avals, depends


def model_exits(model: zoo.AnytimeNet):
  """``exits(params, rest, x)``: the K logits, the stages driven by hand."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def exits(params, rest, x):
    # predict: tracing BatchNorm's statistic updates is slow in flax 0.12;
    # the dataflow between stages is the same in both modes.
    frozen = nnx.view(
      nnx.merge(graphdef, params, rest, copy=True),
      use_running_average=True,
      raise_if_not_found=False,
    )
    carry, logits = frozen.input_carry(x), []
    for stage in frozen.stages:
      carry, out = stage(carry)
      logits.append(out)
    return logits

  return exits, params, rest


def test_exit_dependencies_finds_a_read_of_a_later_stage():
  # The dataflow check can fail: exit 1 reading stage 3 is seen, and so is
  # exit 2 reading stage 1 through an op with a sub-jaxpr (jax.nn.relu).
  def exits(params, x):
    w = params["stages"]
    return [
      x @ w[0] + w[2].sum(),
      jax.nn.relu(x @ w[0]) @ w[1],
      jnp.tanh(x @ w[2]),
    ]

  params = {"stages": {j: jnp.ones((3, 3)) for j in range(3)}}
  _, depends = exit_dependencies(exits, params, jnp.ones((2, 3)))
  np.testing.assert_array_equal(depends, [[1, 0, 1], [1, 1, 0], [0, 0, 1]])


def test_every_name_has_its_backbones_presets():
  for name in NAMES:
    expected, default = PRESETS[name.rsplit("-", 1)[1]]
    assert set(zoo.presets(name)) == expected, name
    assert zoo.default_preset(name) == default


@pytest.mark.parametrize(
  "name, preset",
  [(name, preset) for name in NAMES for preset in zoo.presets(name)],
)
def test_presets_fit_their_data_and_nest(name, preset):
  model = preset_model(name, preset)
  shape, dtype = DATA[preset]
  x = jax.ShapeDtypeStruct((2, *shape), dtype)
  avals, depends = exit_dependencies(*model_exits(model), x)
  # Text: a causal language model, one logit vector per position and byte.
  logits = (2, *shape, 256) if preset.startswith("text") else (2, 10)
  assert [a.shape for a in avals] == [logits] * 4
  assert output_shape(model, x) == (4, *logits)
  # Exit k reads stages 1..k (all of them: each adds to exit k's path) and
  # no later stage.
  np.testing.assert_array_equal(depends, np.tril(np.ones((4, 4), bool)))
  counts = anytime.params_per_exit(model)
  assert np.all(np.diff(counts) > 0), counts
  if preset != "cifar":  # small enough for a CPU run in minutes
    assert counts[-1] < 500_000
    if "cifar" in zoo.presets(name):
      cifar = anytime.params_per_exit(preset_model(name, "cifar"))
      assert counts[-1] < cifar[-1]


def test_presets_returns_copies():
  presets = zoo.presets("branched-mlp")
  presets["digits"]["width"] = -1
  assert zoo.presets("branched-mlp")["digits"]["width"] > 0


def test_config_overrides_the_preset():
  model = abstract("nested-width-mlp", preset="digits", stages=2, width=3)
  assert model.num_exits == 2
  assert model.stages[0].head.linear.kernel.shape == (3, 10)


@pytest.mark.parametrize("name", ["nested-width-resnet", "nested-depth-mlp"])
def test_same_rngs_same_parameters(name):
  config = dict(stages=2, width=2, depth=1)
  a = zoo.create(name, rngs=nnx.Rngs(3), **config)
  b = zoo.create(name, rngs=nnx.Rngs(3), **config)
  c = zoo.create(name, rngs=nnx.Rngs(4), **config)
  pa, pb, pc = (jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (a, b, c))
  for x, y in zip(pa, pb, strict=True):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(pa, pc, strict=True))


@pytest.mark.parametrize(
  "call, match",
  [
    (
      lambda: zoo.create("nested-resnet", rngs=nnx.Rngs(0)),
      "Unknown model 'nested-resnet'.*nested-width-resnet",
    ),
    (lambda: zoo.presets("resnet"), "Unknown model"),
    (
      lambda: zoo.create("branched-mlp", rngs=nnx.Rngs(0), preset="imagenet"),
      "Unknown preset 'imagenet'.*cifar, digits",
    ),
    (
      lambda: zoo.create("branched-mlp", rngs=nnx.Rngs(0), in_channels=3),
      r"Unknown config key\(s\) \['in_channels'\].*in_features",
    ),
    (
      lambda: zoo.create("branched-resnet", rngs=nnx.Rngs(0), widht=8),
      r"\['widht'\].*width",
    ),
    (
      lambda: zoo.create("branched-mlp", rngs=nnx.Rngs(0), norm="instance"),
      "Unknown norm 'instance'.*batch",
    ),
    (
      lambda: zoo.create("nested-width-mlp", rngs=nnx.Rngs(0), stages=0),
      "stages must be an int >= 1, got 0",
    ),
    (
      lambda: zoo.create("nested-depth-mlp", rngs=nnx.Rngs(0), width=0),
      "width must be an int >= 1, got 0",
    ),
    (
      lambda: zoo.create("nested-depth-mlp", rngs=nnx.Rngs(0), width=-4),
      "width must be an int >= 1",
    ),
    (
      lambda: zoo.create("nested-depth-mlp", rngs=nnx.Rngs(0), width=8.0),
      "width must be an int",
    ),
    (
      lambda: zoo.create("branched-mlp", rngs=nnx.Rngs(0), depth=0),
      "depth must be an int >= 1",
    ),
    (
      lambda: zoo.create("branched-mlp", rngs=nnx.Rngs(0), stages=True),
      "stages must be an int",
    ),
    (
      lambda: zoo.create("branched-mlp", rngs=nnx.Rngs(0), num_classes=0),
      "num_classes must be an int >= 1",
    ),
    (
      lambda: zoo.create(
        "nested-width-resnet", rngs=nnx.Rngs(0), in_channels=0
      ),
      "in_channels must be an int >= 1",
    ),
    (
      lambda: zoo.create(
        "nested-width-resnet", rngs=nnx.Rngs(0), downsamples=-1
      ),
      "downsamples must be an int >= 0",
    ),
    (
      lambda: zoo.create("branched-mlp", rngs=nnx.Rngs(0), in_features=0),
      "in_features must be an int >= 1",
    ),
    (
      lambda: zoo.create("branched-mlp", rngs=0),
      "rngs must be a flax.nnx.Rngs",
    ),
    (
      lambda: zoo.NestedDepthNet(
        zoo.conv_backbone(3, 2),
        stages=2,
        width=2,
        depth=1,
        norm="bn",
        rngs=nnx.Rngs(0),
      ),
      "Unknown norm 'bn'",
    ),
    (
      lambda: zoo.BranchedNet(
        zoo.dense_backbone(64), stages=0, width=2, depth=1, rngs=nnx.Rngs(0)
      ),
      "stages must be an int >= 1, got 0",
    ),
    (
      lambda: zoo.NestedWidthNet(
        zoo.dense_backbone(64),
        stages=2,
        width=2,
        depth=2,
        num_classes=-1,
        rngs=nnx.Rngs(0),
      ),
      "num_classes must be an int >= 1, got -1",
    ),
    (
      lambda: zoo.NestedWidthDepthNet(
        "conv", stages=2, width=2, depth=1, rngs=nnx.Rngs(0)
      ),
      r"backbone must be a zoo.Backbone, got str; pass e.g."
      r" zoo.conv_backbone\(in_channels=3, downsamples=2\)",
    ),
    (
      lambda: zoo.conv_backbone(in_channels=0, downsamples=2),
      "in_channels must be an int >= 1, got 0",
    ),
    (
      lambda: zoo.conv_backbone(in_channels=3, downsamples=1.0),
      "downsamples must be an int >= 0, got 1.0",
    ),
    (
      lambda: zoo.dense_backbone(in_features=True),
      "in_features must be an int >= 1, got True",
    ),
    (lambda: zoo.Backbone("rnn", 3), "Unknown backbone kind 'rnn'.*conv"),
    (lambda: zoo.Backbone("conv", 0), "in_features must be an int >= 1"),
    (lambda: zoo.Backbone("conv", 3, -1), "downsamples must be an int >= 0"),
    (
      lambda: zoo.Backbone("dense", 64, 1),
      "dense backbone has no resolution to halve, got downsamples=1; use"
      " downsamples=0",
    ),
  ],
)
def test_bad_names_and_configs_raise_value_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize(
  "name, config, layers, width, most",
  [
    # Each stage doubles the depth: 3 * 2**13 layers.
    ("nested-depth-resnet", dict(stages=14), 24576, 64, 7),
    ("nested-width-depth-mlp", dict(stages=12, width=64), 2048, 131072, 7),
    # Each group doubles the width; stage k is as wide as groups 1..k.
    ("nested-width-mlp", dict(stages=16, width=16), 32, 524288, 9),
    ("branched-mlp", dict(stages=600), 600, 256, 256),
    ("branched-mlp", dict(stages=2, depth=600), 1200, 256, None),
  ],
)
def test_a_network_too_large_to_build_in_minutes_is_refused_up_front(
  name, config, layers, width, most
):
  started = time.perf_counter()
  with pytest.raises(ValueError) as refused:
    zoo.create(name, rngs=nnx.Rngs(0), preset="cifar", **config)
  assert time.perf_counter() - started < 5  # refused before building
  message = str(refused.value)
  assert (
    f"would have {layers} residual layers and stages up to {width}"
    f" features wide (at most {zoo.MAX_LAYERS} and {zoo.MAX_WIDTH}"
    " are built)"
  ) in message, message
  if most is None:
    assert message.endswith("Use a smaller depth or width."), message
  else:
    assert message.endswith(f"Use at most {most} stages with these settings.")
    # The bound is tight: one stage more is refused too. (Building the
    # largest network allowed takes seconds per family; the refusal's advice
    # is what the doctest of zoo.base.check_size shows.)
    with pytest.raises(ValueError, match="would have"):
      zoo.create(
        name, rngs=nnx.Rngs(0), preset="cifar", **dict(config, stages=most + 1)
      )


@pytest.fixture(scope="module")
def tiny():
  return {
    "conv": zoo.create(
      "nested-depth-resnet",
      rngs=nnx.Rngs(0),
      stages=3,
      width=2,
      depth=1,
      in_channels=1,
    ),
    "mlp": zoo.create(
      "nested-width-mlp", rngs=nnx.Rngs(0), stages=3, width=2, depth=1
    ),
  }


@pytest.mark.parametrize("upto", [0, 4, -1, 1.5, True, "2"])
def test_bad_upto_raises(tiny, upto):
  for model in tiny.values():
    with pytest.raises(
      ValueError,
      match=r"upto must be an int between 1 and"
      r" the number of exits \(3\)",
    ):
      model(
        jnp.ones((2, 8, 8, 1) if model is tiny["conv"] else (2, 64)), upto=upto
      )


@pytest.mark.parametrize(
  "key, shape, match",
  [
    ("conv", (2, 64), r"NHWC images of shape \(batch, height, width, 1\)"),
    ("conv", (2, 8, 8, 3), "in_channels=3"),
    ("mlp", (2, 63), r"expects a batch of shape \(batch, 64\)"),
    ("mlp", (64,), r"got shape \(64,\)"),
  ],
)
def test_bad_input_shapes_raise(tiny, key, shape, match):
  with pytest.raises(ValueError, match=match):
    tiny[key](jnp.ones(shape))


def test_convenient_input_layouts(tiny):
  # Grey images without a channel axis, and images fed to an MLP.
  assert tiny["conv"].input_carry(jnp.ones((2, 8, 8))).shape == (2, 8, 8, 1)
  assert tiny["mlp"].input_carry(jnp.ones((2, 8, 8, 1))).shape == (2, 64)
  assert tiny["mlp"].input_carry(jnp.ones((2, 64), jnp.int32)).dtype == (
    jnp.float32
  )


@pytest.mark.parametrize(
  "call, match",
  [
    (
      lambda: zoo.transformer_backbone("audio"),
      r"Unknown input_kind 'audio'; choose one of \('image'",
    ),
    (
      lambda: zoo.transformer_backbone(positions="rotary"),
      r"Unknown positions 'rotary'; choose one of \('learned'",
    ),
    (
      lambda: zoo.transformer_backbone("image", length=8, patch=3),
      "patch=3 does not divide length=8",
    ),
    (
      lambda: zoo.transformer_backbone("tokens", patch=2),
      "Tokens are not patched, got patch=2; use patch=1",
    ),
    (
      lambda: zoo.transformer_backbone(causal="yes"),
      "causal must be True or False, got 'yes'",
    ),
    (lambda: zoo.transformer_backbone(heads=0), "heads must be an int >= 1"),
    (
      lambda: zoo.create(
        "branched-transformer", rngs=nnx.Rngs(0), width=6, heads=4
      ),
      "width 6 cannot be split into 4 attention heads; use a width that is a"
      " multiple of heads=4",
    ),
    (
      lambda: zoo.create(
        "nested-depth-transformer", rngs=nnx.Rngs(0), preset="text",
        norm="batch",
      ),
      "norm='batch' pools statistics over positions.*use norm='layer'",
    ),
    (
      lambda: zoo.create(
        "nested-width-depth-transformer", rngs=nnx.Rngs(0), shared_head=True
      ),
      r"NestedWidthDepthNet's exits read features of widths \[8, 16, 32,"
      r" 64\].*use shared_head=False",
    ),
    (
      lambda: zoo.create(
        "nested-width-transformer", rngs=nnx.Rngs(0), shared_head=True
      ),
      "gives each exit its own head; use shared_head=False",
    ),
    (
      lambda: zoo.create(
        "nested-width-transformer", rngs=nnx.Rngs(0), norm="group"
      ),
      "supports norm='layer' or 'none', got 'group'; use norm='layer'",
    ),
    (
      lambda: zoo.Backbone("transformer", 3, 1),
      "transformer backbone has no resolution to halve",
    ),
    (
      lambda: zoo.conv1d_backbone(in_channels=1, downsamples=-1),
      "downsamples must be an int >= 0, got -1",
    ),
  ],
)  # fmt: skip
def test_bad_transformer_and_conv1d_configs_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize(
  "name, preset, shape, dtype, match",
  [
    ("branched-conv1d", "mnist1d", (2, 40, 3), jnp.float32, "in_channels=3"),
    (
      "branched-conv1d",
      "mnist1d",
      (2, 8, 8, 1),
      jnp.float32,
      r"signals of shape \(batch, length, 1\)",
    ),
    (
      "nested-width-transformer",
      "digits",
      (2, 16, 16, 1),
      jnp.float32,
      r"batch of images of shape \(batch, 8, 8, 1\), got shape \(2, 16, 16,"
      r" 1\)",
    ),
    (
      "branched-transformer",
      "mnist1d",
      (2, 41),
      jnp.float32,
      r"signals of shape \(batch, 40, 1\)",
    ),
    (
      "branched-transformer",
      "text",
      (2, 129),
      jnp.int32,
      r"token ids of shape \(batch, seq\) with seq <= 128",
    ),
  ],
)
def test_bad_inputs_of_the_sequence_backbones_raise(
  name, preset, shape, dtype, match
):
  model = preset_model(name, preset)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.input_carry, jax.ShapeDtypeStruct(shape, dtype))


def test_sequence_backbones_accept_convenient_layouts():
  conv1d = preset_model("branched-conv1d", "mnist1d")
  assert conv1d.input_carry(jnp.ones((2, 40))).shape == (2, 40, 1)
  vit = preset_model("branched-transformer", "digits")
  assert vit.backbone.num_tokens == 16
  assert vit.input_carry(jnp.ones((2, 8, 8))).shape == (2, 8, 8, 1)
  lm = preset_model("branched-transformer", "text")
  # Shorter windows than the context length, and ids held in floats.
  assert lm.input_carry(jnp.ones((2, 5))).dtype == jnp.int32
