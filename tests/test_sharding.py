"""The sharded OSGD projection and the mesh helpers, on 8 CPU devices.

``tests/conftest.py`` gives the session 8 host devices. The sharded update must
equal the unsharded one, keep the parameters' shardings, and never gather a
stacked gradient leaf: its compiled HLO may hold all-reduces of the small K×K
Gram blocks, and nothing else that moves gradient data between devices.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import osgd_jax
from osgd_jax import aggregation, sharding

K = 3

pytestmark = pytest.mark.skipif(
  jax.device_count() < 8,
  reason="needs 8 devices; tests/conftest.py sets XLA_FLAGS for them",
)


def _mesh(data, model, explicit=False):
  kind = AxisType.Explicit if explicit else AxisType.Auto
  return jax.make_mesh((data, model), ("data", "model"), axis_types=(kind,) * 2)


# Leaves of a small network, each with a sharding that exercises one case:
# split on the first, a middle or the last dimension, over one axis or both,
# or replicated (a dimension no axis divides, like a 10-class head bias).
PARAM_SHAPES = {
  "conv": (3, 3, 4, 8),
  "dense": (16, 12),
  "bias": (10,),
  "scale": (8,),
}


def _specs(mesh):
  both = ("data", "model")
  return {
    "conv": P(None, None, None, "model"),
    "dense": P(both, None) if 16 % mesh.size == 0 else P("model", None),
    "bias": P(),
    "scale": P("data") if 8 % mesh.shape["data"] == 0 else P(),
  }


def _stacked(seed=0, collinear=True):
  rng = np.random.default_rng(seed)
  grads = {
    k: rng.normal(size=(K,) + s).astype(np.float32)
    for k, s in PARAM_SHAPES.items()
  }
  if collinear:  # a degenerate row and a zero row take the special paths
    grads["dense"][2] = 2.0 * grads["dense"][0]
    grads["scale"][1] = 0.0
  return grads


def _place(tree, mesh, specs, stacked):
  return {
    k: jax.device_put(
      v, NamedSharding(mesh, P(None, *specs[k]) if stacked else specs[k])
    )
    for k, v in tree.items()
  }


def _assert_only_gram_blocks(collectives, num_leaves: int) -> None:
  """Every collective is an all-reduce of K×K blocks (at most one per leaf).

  The CPU kernel reduces the blocks of the leaves split over the same mesh
  axes together, as one ``(n, K, K)`` array; nothing of the size of a
  gradient ever crosses devices.
  """
  assert all(op == "all-reduce" for op, _ in collectives), collectives
  for _, shape in collectives:
    for dims in re.findall(r"\[([\d,]*)\]", shape):
      sizes = [int(d) for d in dims.split(",") if d]
      assert all(d <= K for d in sizes[-2:]), shape
      assert int(np.prod(sizes)) <= num_leaves * K * K, shape


def _collectives(hlo: str) -> list[tuple[str, str]]:
  """``(op, result shape)`` of every cross-device op in compiled HLO text."""
  ops = "all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter"
  pattern = re.compile(rf"^\s*\S+ = (.*?) ({ops})(?:-start)?\(", re.MULTILINE)
  return [(m.group(2), m.group(1)) for m in pattern.finditer(hlo)]


CASES = [
  # (data, model, explicit axes, method, granularity)
  (4, 2, False, "gram", "leaf"),
  (2, 4, False, "gram", "global"),
  (1, 8, False, "sequential", "leaf"),
  (8, 1, False, "sequential", "global"),
  (4, 2, True, "gram", "leaf"),
  (2, 4, True, "sequential", "global"),
]


@pytest.mark.parametrize("data,model,explicit,method,granularity", CASES)
def test_sharded_update_equals_unsharded_and_keeps_shardings(
  data, model, explicit, method, granularity
):
  mesh = _mesh(data, model, explicit)
  specs = _specs(mesh)
  grads = _stacked()
  params = {k: np.zeros(s, np.float32) for k, s in PARAM_SHAPES.items()}
  tx = osgd_jax.osgd(method=method, granularity=granularity, num_exits=K)
  expected, expected_state = jax.jit(tx.update)(
    jax.tree.map(jnp.asarray, grads), tx.init(params), params
  )

  s_grads = _place(grads, mesh, specs, stacked=True)
  s_params = _place(params, mesh, specs, stacked=False)
  update = jax.jit(tx.update)
  compiled = update.lower(s_grads, tx.init(s_params), s_params).compile()
  out, state = update(s_grads, tx.init(s_params), s_params)

  for name in PARAM_SHAPES:
    np.testing.assert_allclose(
      out[name], expected[name], rtol=2e-5, atol=2e-6, err_msg=name
    )
    assert out[name].sharding.is_equivalent_to(
      s_params[name].sharding, len(PARAM_SHAPES[name])
    ), name
  for got, want in zip(state, expected_state, strict=True):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  # The compiled outputs, not only the values' placement, follow the params.
  out_shardings = compiled.output_shardings[0]
  for name in PARAM_SHAPES:
    assert out_shardings[name].is_equivalent_to(
      s_params[name].sharding, len(PARAM_SHAPES[name])
    ), name

  collectives = _collectives(compiled.as_text())
  # Only K-vectors and K×K blocks are reduced across devices.
  _assert_only_gram_blocks(collectives, len(PARAM_SHAPES))
  if model > 1 or granularity == "global":
    assert collectives, "a split leaf needs its partial Gram sums reduced"


def test_uneven_shards_inside_jit_give_the_unsharded_update():
  # 10 and 6 do not divide over 4 devices: XLA pads the shards internally.
  mesh = _mesh(2, 4)
  rng = np.random.default_rng(1)
  g = rng.normal(size=(K, 10, 6)).astype(np.float32)
  g[2] = g[0] - 3.0 * g[1]
  tx = osgd_jax.osgd(num_exits=K)
  params = {"w": jnp.zeros((10, 6))}

  def sharded_update(stacked):
    stacked = jax.lax.with_sharding_constraint(
      stacked, NamedSharding(mesh, P(None, "model", "data"))
    )
    out, _ = tx.update({"w": stacked}, tx.init(params), params)
    return out["w"]

  compiled = jax.jit(sharded_update).lower(g).compile()
  gathered = [
    shape
    for op, shape in _collectives(compiled.as_text())
    if op == "all-gather"
    and shape.count(",") == 2
    and re.search(rf"\[{K},", shape)
  ]
  assert not gathered, gathered
  expected, _ = tx.update({"w": jnp.asarray(g)}, tx.init(params), params)
  np.testing.assert_allclose(
    jax.jit(sharded_update)(g), expected["w"], rtol=2e-5, atol=2e-6
  )


# Large enough that every device holds several thousand parameters.
LARGE = 3 << 14


@pytest.mark.parametrize(
  "shape,spec,mesh_shape,explicit",
  [
    ((LARGE,), P("model"), (2, 4), False),
    ((LARGE,), P(("data", "model")), (2, 4), False),
    ((8, 3, LARGE // 24), P(None, None, "model"), (4, 2), False),
    ((64, LARGE // 64), P("data", "model"), (4, 2), False),  # both axes
    ((64, LARGE // 64), P(None, "model"), (4, 2), True),  # Explicit axes
  ],
)
def test_large_leaves_are_never_gathered(shape, spec, mesh_shape, explicit):
  mesh = _mesh(*mesh_shape, explicit=explicit)
  rng = np.random.default_rng(5)
  g = rng.normal(size=(K,) + shape).astype(np.float32)
  g[2] = g[0] - 0.5 * g[1] + 1e-2 * g[2]  # nearly in the span: a real test
  params = {"w": np.zeros(shape, np.float32)}
  tx = osgd_jax.osgd(num_exits=K)
  expected, expected_state = jax.jit(tx.update)(
    {"w": jnp.asarray(g)}, tx.init(params), params
  )

  s_params = {"w": jax.device_put(params["w"], NamedSharding(mesh, spec))}
  s_grads = {"w": jax.device_put(g, NamedSharding(mesh, P(None, *spec)))}
  update = jax.jit(tx.update)
  compiled = update.lower(s_grads, tx.init(s_params), s_params).compile()
  out, state = update(s_grads, tx.init(s_params), s_params)
  np.testing.assert_allclose(out["w"], expected["w"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
    state.exit_norms, expected_state.exit_norms, rtol=1e-5
  )
  assert out["w"].sharding.is_equivalent_to(s_params["w"].sharding, len(shape))
  collectives = _collectives(compiled.as_text())
  assert collectives
  _assert_only_gram_blocks(collectives, 1)


def test_many_leaves_reduce_only_their_gram_blocks():
  """Leaves split over any set of mesh axes reduce only K×K blocks."""
  mesh = _mesh(4, 2)
  specs = {f"m{i}": P(None, "model") for i in range(5)}  # 5 on model
  specs.update({f"d{i}": P("data", None) for i in range(3)})  # 3 on data
  specs.update({"r": P(), "b": P(("data", "model"))})  # none; both
  shapes = {name: (16, 6) if name != "b" else (16,) for name in specs}
  rng = np.random.default_rng(9)
  grads = {
    n: rng.normal(size=(K,) + s).astype(np.float32) for n, s in shapes.items()
  }
  grads["m3"][2] = grads["m3"][0]  # a degenerate row on one leaf
  params = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
  tx = osgd_jax.osgd(num_exits=K)
  expected, _ = jax.jit(tx.update)(
    jax.tree.map(jnp.asarray, grads), tx.init(params), params
  )
  s_grads = _place(grads, mesh, specs, stacked=True)
  s_params = _place(params, mesh, specs, stacked=False)
  update = jax.jit(tx.update)
  text = update.lower(s_grads, tx.init(s_params), s_params).compile().as_text()
  out, _ = update(s_grads, tx.init(s_params), s_params)
  for name in shapes:
    np.testing.assert_allclose(
      out[name], expected[name], rtol=2e-5, atol=2e-6, err_msg=name
    )
  collectives = _collectives(text)
  _assert_only_gram_blocks(collectives, len(shapes))


@pytest.mark.parametrize(
  "make",
  [
    lambda: aggregation.upgrad(num_exits=K),
    lambda: aggregation.pcgrad(seed=0, num_exits=K),
    lambda: aggregation.weighted_sum("geometric", num_exits=K),
  ],
)
def test_baseline_aggregators_run_sharded(make):
  mesh = _mesh(4, 2, explicit=True)
  specs = _specs(mesh)
  grads = _stacked(2, collinear=False)
  params = {k: np.zeros(s, np.float32) for k, s in PARAM_SHAPES.items()}
  tx = make()
  expected, _ = jax.jit(tx.update)(
    jax.tree.map(jnp.asarray, grads), tx.init(params), params
  )
  s_params = _place(params, mesh, specs, stacked=False)
  out, _ = jax.jit(tx.update)(
    _place(grads, mesh, specs, stacked=True), tx.init(s_params), s_params
  )
  for name in PARAM_SHAPES:
    np.testing.assert_allclose(out[name], expected[name], rtol=2e-5, atol=2e-6)


def test_per_exit_grads_keep_the_param_sharding():
  mesh = sharding.make_mesh("data=4,model=2")
  rng = np.random.default_rng(3)
  params = sharding.shard_params(
    {
      "w1": rng.normal(size=(6, 8)).astype(np.float32),
      "w2": rng.normal(size=(8, 4)).astype(np.float32),
    },
    mesh,
  )
  x = sharding.shard_batch(rng.normal(size=(16, 6)).astype(np.float32), mesh)

  def loss_fn(p, x):
    h = jnp.tanh(x @ p["w1"])
    return jnp.stack([jnp.mean(h**2), jnp.mean((h @ p["w2"]) ** 2)])

  def step(p, x):
    _, grads = osgd_jax.value_and_per_exit_grads(loss_fn)(p, x)
    return grads

  grads = jax.jit(
    step,
    out_shardings=sharding.stacked_shardings(
      sharding.param_shardings(params, mesh)
    ),
  )(params, x)
  _, expected = osgd_jax.value_and_per_exit_grads(loss_fn)(
    jax.tree.map(np.asarray, params), np.asarray(x)
  )
  for name in params:
    assert grads[name].sharding.spec == P(None, *params[name].sharding.spec)
    np.testing.assert_allclose(
      grads[name], expected[name], rtol=1e-5, atol=1e-6
    )


# --- mesh helpers ---


def test_make_mesh_from_spec():
  mesh = sharding.make_mesh("data=4,model=2")
  assert mesh.axis_names == ("data", "model")
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  assert dict(sharding.make_mesh("model=-1").shape) == {"data": 1, "model": 8}
  assert dict(sharding.make_mesh("data=-1,model=2").shape) == {
    "data": 4,
    "model": 2,
  }
  assert dict(sharding.make_mesh({"data": 8}).shape) == {"data": 8, "model": 1}


@pytest.mark.parametrize(
  "spec,message",
  [
    ("data=3,model=2", "needs 6 devices but 8 are available"),
    ("data=4,model=2,pipe=1", "unknown axis 'pipe'"),
    ("data4", "not of the form axis=size"),
    ("data=0", "positive integer"),
    ("data=two", "positive integer"),
    ("data=-1,model=-1", "only one axis may be -1"),
    ("data=-1,model=3", "does not divide the 8 devices"),
    ("data=2,data=4", "given twice"),
  ],
)
def test_bad_mesh_specs_name_the_problem(spec, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    sharding.make_mesh(spec)


@settings(max_examples=60, deadline=None)
@given(
  shape=st.lists(st.integers(1, 40), min_size=0, max_size=4),
  model=st.sampled_from([1, 2, 3, 4, 8]),
)
def test_param_spec_splits_the_largest_divisible_dimension(shape, model):
  spec = sharding.param_spec(shape, model)
  assert len(spec) == len(shape)
  split = [d for d, axis in enumerate(spec) if axis is not None]
  divisible = [d for d, size in enumerate(shape) if size % model == 0]
  if model == 1 or not divisible:
    assert split == []
  else:
    assert split == [min(divisible, key=lambda d: (-shape[d], d))]
    assert spec[split[0]] == "model"


def test_shard_params_follows_the_rule_and_keeps_values():
  mesh = sharding.make_mesh("data=4,model=2")
  tree = {
    "conv": np.arange(3 * 3 * 5 * 8, dtype=np.float32).reshape(3, 3, 5, 8),
    "bias": np.ones(7, np.float32),
  }
  placed = sharding.shard_params(tree, mesh)
  assert placed["conv"].sharding.spec == P(None, None, None, "model")
  assert placed["bias"].sharding.spec == P(None)  # 7 is odd: replicated
  np.testing.assert_array_equal(placed["conv"], tree["conv"])
  shards = placed["conv"].addressable_shards
  assert {s.data.shape for s in shards} == {(3, 3, 5, 4)}


def test_an_indivisible_spec_names_the_leaf_and_the_fix():
  mesh = sharding.make_mesh("data=4,model=2")
  tree = {"head": {"kernel": np.zeros((6, 10), np.float32)}}
  specs = {"head": {"kernel": P(None, ("data", "model"))}}
  with pytest.raises(
    ValueError,
    match=r"head/kernel.*dimension 1 \(size 10\)"
    r".*does not divide.*8 devices.*replicate",
  ):
    sharding.shard_params(tree, mesh, specs)


def test_shard_batch_splits_over_data_and_checks_divisibility():
  mesh = sharding.make_mesh("data=4,model=2")
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  out = sharding.shard_batch({"x": x}, mesh)["x"]
  assert out.sharding.spec == P("data")
  np.testing.assert_array_equal(out, x)
  with pytest.raises(
    ValueError, match="batch of 6 examples does not divide over the 4 devices"
  ):
    sharding.shard_batch(np.zeros((6, 3)), mesh)


def test_constrain_pins_the_rule_inside_jit():
  mesh = sharding.make_mesh("data=4,model=2")
  out = jax.jit(
    lambda t: sharding.constrain(jax.tree.map(lambda a: a * 2, t), mesh)
  )({"w": jnp.ones((3, 4))})
  assert out["w"].sharding.spec == P(None, "model")


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
  for name in (
    "JAX_COORDINATOR_ADDRESS",
    "TPU_WORKER_HOSTNAMES",
    "SLURM_JOB_ID",
    "OMPI_MCA_orte_hnp_uri",
  ):
    monkeypatch.delenv(name, raising=False)
  assert sharding.initialize_distributed() is False
  monkeypatch.setenv("SLURM_JOB_ID", "1")
  monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task Slurm job: one process
  assert sharding.initialize_distributed() is False


def test_initialize_distributed_rejects_a_partial_environment(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
  with pytest.raises(ValueError, match="JAX_PROCESS_ID must be an integer"):
    sharding.initialize_distributed()
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 must be in \[0"):
    sharding.initialize_distributed()


def test_explicit_mesh_is_found_only_under_explicit_axes():
  x = np.ones((8, 3), np.float32)
  explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  auto = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  assert sharding.explicit_mesh(jnp.asarray(x)) is None
  with jax.set_mesh(explicit):
    xs = jax.device_put(x, NamedSharding(explicit, P("data")))
    # The abstract form of the mesh, outside jit and on a tracer inside it.
    seen = [sharding.explicit_mesh(xs)]
    jax.jit(lambda t: seen.append(sharding.explicit_mesh(t)) or t)(xs)
    for mesh in seen:
      assert mesh == explicit.abstract_mesh, mesh
  xa = jax.device_put(x, NamedSharding(auto, P("data")))
  assert sharding.explicit_mesh(xa) is None
