"""The native conv weight gradient against a float64 NumPy oracle and XLA.

:func:`osgd_jax.cpu_conv.conv_general_dilated` (what the zoo's convolutions
call) keeps XLA's forward and input gradient and takes the weight gradient
from ``osgd_jax/csrc/conv_cpu.cc`` on CPU. It must equal the oracle and
XLA's gradient, batch, shard over a mesh, and fall back to XLA wherever the
kernel does not apply.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from osgd_jax import cpu_conv, native, zoo

LAYOUT = ("NHWC", "HWIO", "NHWC")
KERNEL_TARGET = "osgd_jax_conv_dw"


@pytest.fixture(autouse=True)
def _kernel_built():
  assert native.available(), "the native CPU kernels did not build"


def oracle_weight_grad(x, dy, kernel_hw, strides, pads):
  """dw[a, b] = Σ_{n,i,j} x_pad[n, i·sh + a, j·sw + b] ⊗ dy[n, i, j], float64."""
  x = np.asarray(x, np.float64)
  dy = np.asarray(dy, np.float64)
  xp = np.pad(x, ((0, 0), *pads, (0, 0)))
  (kh, kw), (sh, sw) = kernel_hw, strides
  _, oh, ow, _ = dy.shape
  dw = np.zeros((kh, kw, x.shape[-1], dy.shape[-1]))
  for a in range(kh):
    for b in range(kw):
      window = xp[:, a:a + sh * (oh - 1) + 1:sh, b:b + sw * (ow - 1) + 1:sw]
      dw[a, b] = np.einsum("nijc,nijo->co", window, dy)
  return dw


def _pads(padding, in_hw, kernel_hw, strides):
  if isinstance(padding, str):
    return tuple(jax.lax.padtype_to_pads(in_hw, kernel_hw, strides, padding))
  return tuple(padding)


def _problem(n, h, w, ci, co, kernel_hw, strides, padding, dtype, seed=0):
  rng = np.random.default_rng(seed)
  pads = _pads(padding, (h, w), kernel_hw, strides)
  oh, ow = ((size + lo + hi - k) // s + 1 for size, (lo, hi), k, s in
            zip((h, w), pads, kernel_hw, strides))
  x = rng.standard_normal((n, h, w, ci)).astype(dtype)
  dy = rng.standard_normal((n, oh, ow, co)).astype(dtype)
  return x, dy, pads


def _kernel_calls(fn, *args) -> int:
  return jax.jit(fn).lower(*args).as_text().count(KERNEL_TARGET)


CASES = [  # n, h, w, ci, co, kernel, strides, padding
    (2, 5, 7, 3, 5, (3, 3), (1, 1), "SAME"),
    (2, 6, 6, 4, 17, (3, 3), (2, 2), "SAME"),
    (3, 8, 8, 7, 24, (1, 1), (2, 2), "SAME"),
    (2, 9, 9, 13, 8, (3, 3), (2, 1), "VALID"),
    (1, 7, 6, 1, 1, (5, 3), (1, 2), ((2, 0), (1, 3))),
    (2, 4, 4, 16, 33, (3, 3), (1, 1), ((0, 0), (4, 4))),  # padding > kernel
    (2, 3, 3, 6, 16, (3, 3), (3, 3), "SAME"),
    # Narrow images: the kernel's chunks of ~128 positions span many rows,
    # so a tap's valid rows start and end inside chunks.
    (1, 70, 4, 3, 8, (3, 3), (1, 1), "SAME"),
    (1, 130, 2, 3, 9, (5, 3), (2, 1), ((2, 2), (1, 1))),
    # Enough work for the multi-threaded path (≥ 2²¹ multiply-adds).
    (16, 16, 16, 16, 16, (3, 3), (1, 1), "SAME"),
    (8, 16, 16, 32, 64, (3, 3), (2, 2), "SAME"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_float32_matches_the_float64_oracle(case):
  n, h, w, ci, co, kernel_hw, strides, padding = case
  x, dy, pads = _problem(n, h, w, ci, co, kernel_hw, strides, padding,
                         np.float32)
  got = jax.jit(cpu_conv.weight_grad, static_argnums=(2, 3, 4))(
      x, dy, kernel_hw, strides, padding)
  want = oracle_weight_grad(x, dy, kernel_hw, strides, pads)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("case", CASES[::3], ids=str)
def test_float64_under_x64_matches_the_oracle_to_rounding(case):
  n, h, w, ci, co, kernel_hw, strides, padding = case
  x, dy, pads = _problem(n, h, w, ci, co, kernel_hw, strides, padding,
                         np.float64, seed=1)
  with jax.enable_x64(True):
    got = cpu_conv.weight_grad(jnp.asarray(x), jnp.asarray(dy), kernel_hw,
                               strides, padding)
    assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, oracle_weight_grad(x, dy, kernel_hw,
                                                     strides, pads),
                             rtol=1e-12, atol=1e-12)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
       ci=st.integers(1, 9), co=st.integers(1, 20), kh=st.integers(1, 4),
       kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
       padding=st.sampled_from(["SAME", "VALID", "SAME_LOWER"]))
def test_any_geometry_matches_the_oracle(n, h, w, ci, co, kh, kw, sh, sw,
                                         padding):
  if padding == "VALID" and (kh > h or kw > w):
    padding = "SAME"  # VALID needs the kernel to fit
  x, dy, pads = _problem(n, h, w, ci, co, (kh, kw), (sh, sw), padding,
                         np.float32, seed=h * w + ci)
  got = cpu_conv.weight_grad(x, dy, (kh, kw), (sh, sw), padding)
  want = oracle_weight_grad(x, dy, (kh, kw), (sh, sw), pads)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"),
                                             ((2, 2), "SAME"),
                                             ((1, 2), ((2, 0), (1, 3)))])
def test_gradients_equal_xla_and_use_the_kernel(strides, padding):
  x, _, _ = _problem(4, 9, 9, 5, 7, (3, 3), strides, padding, np.float32)
  w = np.random.default_rng(3).standard_normal((3, 3, 5, 7)).astype(
      np.float32)

  def loss(conv):
    return lambda x, w: jnp.sum(jnp.sin(conv(
        x, w, strides, padding, dimension_numbers=LAYOUT)))

  ours = jax.jit(jax.value_and_grad(loss(cpu_conv.conv_general_dilated),
                                    (0, 1)))(x, w)
  xla = jax.value_and_grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
  np.testing.assert_array_equal(ours[0], xla[0])        # XLA's forward
  np.testing.assert_array_equal(ours[1][0], xla[1][0])  # and XLA's dX
  np.testing.assert_allclose(ours[1][1], xla[1][1], rtol=1e-5, atol=1e-4)
  assert _kernel_calls(jax.grad(loss(cpu_conv.conv_general_dilated), 1),
                       x, w) == 1


def test_vmap_over_cotangents_inputs_or_both():
  x, dy, _ = _problem(3, 6, 6, 4, 5, (3, 3), (1, 1), "SAME", np.float32)
  rng = np.random.default_rng(4)
  xs = rng.standard_normal((2,) + x.shape).astype(np.float32)
  dys = rng.standard_normal((2,) + dy.shape).astype(np.float32)
  dw = lambda x, dy: cpu_conv.weight_grad(x, dy, (3, 3), (1, 1), "SAME")
  for axes, args in (((None, 0), (x, dys)), ((0, None), (xs, dy)),
                     ((0, 0), (xs, dys))):
    got = jax.jit(jax.vmap(dw, axes))(*args)
    for b in range(2):
      xb = args[0][b] if axes[0] == 0 else args[0]
      dyb = args[1][b] if axes[1] == 0 else args[1]
      np.testing.assert_allclose(
          got[b], oracle_weight_grad(xb, dyb, (3, 3), (1, 1),
                                     ((1, 1), (1, 1))), rtol=1e-5, atol=1e-5)


def test_sharded_over_a_batch_mesh_sums_the_shards_without_gathering():
  mesh = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(AxisType.Auto,) * 2)
  x, dy, pads = _problem(8, 8, 8, 3, 5, (3, 3), (1, 1), "SAME", np.float32)
  want = oracle_weight_grad(x, dy, (3, 3), (1, 1), pads)
  dw = jax.jit(lambda x, dy: cpu_conv.weight_grad(x, dy, (3, 3), (1, 1),
                                                  "SAME"))
  for spec in (PartitionSpec("data"), PartitionSpec(("data", "model")),
               PartitionSpec(None, "data")):  # a split of H is gathered
    args = [jax.device_put(a, NamedSharding(mesh, spec)) for a in (x, dy)]
    got = dw(*args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    hlo = dw.lower(*args).compile().as_text()
    assert hlo.count(KERNEL_TARGET) == 1
    if spec != PartitionSpec(None, "data"):
      assert "all-gather" not in hlo and "all-reduce" in hlo


def test_explicit_mesh_axes_take_xla():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  x, _, _ = _problem(8, 6, 6, 3, 5, (3, 3), (1, 1), "SAME", np.float32)
  w = np.ones((3, 3, 3, 5), np.float32)
  loss = lambda x, w: jnp.sum(cpu_conv.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=LAYOUT) ** 2)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    ws = jax.device_put(w, NamedSharding(mesh, PartitionSpec()))
    assert not cpu_conv.takes(xs, ws, dimension_numbers=LAYOUT)
    got = jax.jit(jax.grad(loss, 1))(xs, ws)
    assert _kernel_calls(jax.grad(loss, 1), xs, ws) == 0
  np.testing.assert_allclose(got, jax.grad(loss, 1)(x, w), rtol=1e-5)


@pytest.mark.parametrize("kwargs,dtype", [
    ({"dimension_numbers": ("NCHW", "OIHW", "NCHW")}, np.float32),
    ({"rhs_dilation": (2, 2)}, np.float32),
    ({"lhs_dilation": (2, 1), "padding": ((1, 1), (1, 1))}, np.float32),
    ({"feature_group_count": 2}, np.float32),
    ({"preferred_element_type": jnp.float64}, np.float32),
    ({}, jnp.bfloat16),
    ({"padding": ((-1, 0), (1, 1))}, np.float32),  # negative padding
])
def test_what_the_kernel_does_not_take_runs_on_xla(kwargs, dtype):
  kwargs = {"dimension_numbers": LAYOUT, "padding": "SAME", **kwargs}
  padding = kwargs.pop("padding")
  nchw = kwargs["dimension_numbers"][0] == "NCHW"
  x = jnp.asarray(np.random.default_rng(5).standard_normal(
      (2, 4, 6, 6) if nchw else (2, 6, 6, 4)), dtype)
  w = jnp.ones((4, 2 if kwargs.get("feature_group_count") else 4, 3, 3)
               if nchw else
               (3, 3, 2 if kwargs.get("feature_group_count") else 4, 4),
               dtype)
  loss = lambda conv: (lambda x, w: jnp.sum(conv(x, w, (1, 1), padding,
                                                 **kwargs).astype(
                                                     jnp.float32) ** 2))
  with jax.enable_x64("preferred_element_type" in kwargs):
    ours = jax.grad(loss(cpu_conv.conv_general_dilated), (0, 1))(x, w)
    want = jax.grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
    assert _kernel_calls(jax.grad(loss(cpu_conv.conv_general_dilated), 1),
                         x, w) == 0
  for a, b in zip(ours, want):
    np.testing.assert_array_equal(a, b)


def test_bad_shapes_and_padding_are_named():
  x = jnp.ones((2, 6, 6, 3))
  with pytest.raises(ValueError, match=r"dy must have shape \(N, OH, OW, Co\)"
                     r" = \(2, 6, 6, Co\)"):
    cpu_conv.weight_grad(x, jnp.ones((2, 5, 6, 4)), (3, 3), (1, 1), "SAME")
  with pytest.raises(ValueError, match="x .N, H, W, Ci. and dy"):
    cpu_conv.weight_grad(x[0], jnp.ones((6, 6, 4)), (3, 3), (1, 1), "SAME")
  with pytest.raises(ValueError, match="non-negative padding"):
    cpu_conv.weight_grad(x, jnp.ones((2, 6, 6, 4)), (3, 3), (1, 1),
                         ((-1, 1), (1, 1)))
  with pytest.raises(ValueError, match="strides and kernel sizes must be"):
    cpu_conv.weight_grad(x, jnp.ones((2, 6, 6, 4)), (3, 3), (0, 1), "SAME")


def test_without_the_kernel_it_says_so_and_the_conv_falls_back(monkeypatch):
  monkeypatch.setattr(native, "available", lambda: False)
  x = jnp.ones((2, 6, 6, 3))
  with pytest.raises(RuntimeError, match="needs the native kernel"):
    cpu_conv.weight_grad(x, jnp.ones((2, 6, 6, 4)), (3, 3), (1, 1), "SAME")
  w = jnp.ones((3, 3, 3, 4))
  loss = lambda x, w: jnp.sum(cpu_conv.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=LAYOUT))
  assert _kernel_calls(jax.grad(loss, 1), x, w) == 0


def test_zoo_convolutions_take_their_weight_gradient_from_the_kernel():
  model = zoo.BranchedResNet(num_classes=3, stages=2, width=4, depth=1,
                             rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 8, 8, 3)),
                  jnp.float32)
  model.eval()  # BatchNorm reads its running statistics: nothing to update
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x)[-1])

  convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]
  assert convs and all(
      c.conv_general_dilated is cpu_conv.conv_general_dilated for c in convs)
  assert _kernel_calls(jax.grad(loss), params) == len(convs)


def test_derivatives_of_the_gradient_equal_xla():
  """grad of grad and jvp of grad go through XLA's form of the kernel."""
  x, _, _ = _problem(2, 6, 6, 3, 4, (3, 3), (2, 2), "SAME", np.float32)
  w = np.random.default_rng(7).standard_normal((3, 3, 3, 4)).astype(
      np.float32)

  def loss(conv):
    return lambda x, w: jnp.sum(jnp.tanh(conv(
        x, w, (2, 2), "SAME", dimension_numbers=LAYOUT)) ** 2)

  def grad_norm(conv):
    return lambda x, w: jnp.sum(jax.grad(loss(conv), (0, 1))(x, w)[1] ** 2)

  ours = jax.jit(jax.grad(grad_norm(cpu_conv.conv_general_dilated),
                          (0, 1)))(x, w)
  want = jax.grad(grad_norm(jax.lax.conv_general_dilated), (0, 1))(x, w)
  for a, b in zip(ours, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  tangent = np.ones_like(w)
  hvp = lambda conv: jax.jvp(lambda w_: jax.grad(loss(conv), 1)(x, w_),
                             (w,), (tangent,))[1]
  np.testing.assert_allclose(hvp(cpu_conv.conv_general_dilated),
                             hvp(jax.lax.conv_general_dilated),
                             rtol=1e-4, atol=1e-4)


def test_forward_mode_through_the_convolution_is_refused_by_jax():
  x = jnp.ones((1, 4, 4, 2))
  w = jnp.ones((3, 3, 2, 2))
  conv = lambda w_: cpu_conv.conv_general_dilated(
      x, w_, (1, 1), "SAME", dimension_numbers=LAYOUT)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(conv, (w,), (w,))
