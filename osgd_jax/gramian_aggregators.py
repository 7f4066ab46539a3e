"""TorchJD 0.18's aggregators that weight the Gram matrix, as Optax transforms.

The same contract as :func:`osgd_jax.osgd` and :mod:`osgd_jax.aggregators`:
stacked per-exit gradients in, one parameter-shaped update out, first in an
Optax chain. Each is :func:`osgd_jax.from_weighting` of a weighting of
:mod:`osgd_jax.weightings` (CR-MOGM smooths any of them); the state that a
method keeps (a PRNG key, a running target, the last weights) lives in the
Optax state, its shapes fixed at ``init``.

================================  ===============================================
:func:`random_weighting`          Random: softmax of Gaussian weights, every step
:func:`imtl_g`                    IMTL-G: equal projections on the unit gradients
:func:`aligned_mtl`               Aligned-MTL: the sum of aligned (orthogonal,
                                  equal-norm) gradients
:func:`krum`                      Krum: the gradient(s) nearest their neighbours
:func:`dualproj`                  DualProj: the mean, projected onto the dual cone
:func:`gradvac`                   GradVac: cosines raised to running targets
:func:`cagrad`                    CAGrad: the best worst case in a ball around
                                  the mean
:func:`config`                    ConFIG: equal cosines with every gradient
:func:`fairgrad`                  FairGrad: α-fair improvements of the exits
:func:`modo`                      MoDo: one projected step of MGDA's weights per
                                  update
:func:`sdmgrad`                   SDMGrad: MGDA's weights pulled to the mean
:func:`crmogm`                    CR-MOGM: any weighting, smoothed by an EMA
:func:`pcd`                       PCD: exit 1 first, the others guaranteed
                                  progress
:func:`nash_mtl`                  Nash-MTL: the Nash bargaining solution
================================  ===============================================
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from osgd_jax import aggregation
from osgd_jax import gram as gram_lib
from osgd_jax import weightings
from osgd_jax.aggregators import check_qp_options, keyed

__all__ = [
    "CRMOGMState",
    "CRMOGM_WEIGHTINGS",
    "GradVacState",
    "NashMTLState",
    "PCDState",
    "SimplexState",
    "aligned_mtl",
    "cagrad",
    "config",
    "crmogm",
    "dualproj",
    "fairgrad",
    "gradvac",
    "imtl_g",
    "krum",
    "modo",
    "nash_mtl",
    "pcd",
    "random_weighting",
    "sdmgrad",
]


def random_weighting(
    seed: int = 0,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """Random weighting: ``u = Σ_k w_k g_k`` with ``w = softmax(z)``, ``z ~ N(0, I)``.

  Fresh weights at every step (:func:`osgd_jax.weightings.random_weighting`,
  TorchJD's ``Random``), from a PRNG key that the state carries, split at
  every update, so a run is reproducible from ``seed``. Under
  ``granularity="leaf"`` every leaf starts from the same key, hence draws
  the same weights. The weights sum to 1: the update is about the size of
  one gradient.

  Args:
    seed: seeds the weights.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`~osgd_jax.KeyState` per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.random_weighting(seed=0, num_exits=3)
    >>> _, state = tx.update({"w": jnp.ones((3, 2))}, tx.init({"w": jnp.zeros(2)}))
    >>> round(float(state.weights.sum()), 5)
    1.0

  References:
    Lin, Ye, Xu, Shi & Zhang, *Reasonable Effectiveness of Random Weighting:
    A Litmus Test for Multi-Task Learning*, TMLR 2022.
    https://arxiv.org/abs/2111.10603
  """
  return aggregation.from_weighting(
      keyed(weightings.random_weighting, seed), num_exits=num_exits,
      granularity=granularity, name="random_weighting")


def imtl_g(
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """IMTL-G: the update with equal projections on every exit's unit gradient.

  ``u = Σ_k w_k g_k`` with ``w = M⁺ d / Σ(M⁺ d)``, ``d_k = ‖g_k‖``
  (:func:`osgd_jax.weightings.imtl_g`, TorchJD's ``IMTLG``): ``⟨u, g_k⟩ /
  ‖g_k‖`` is the same for every exit, so none is favoured.

  Invariance: scaling exit k's gradient by ``c_k > 0`` leaves the line of
  u unchanged (its size and sign follow the normalisation ``Σ w = 1``);
  invariant to the exits' order.

  Args:
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.imtl_g(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.75, 0.75]

  References:
    Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021.
    https://openreview.net/forum?id=IMPnRXEWpvr
  """
  return aggregation.from_weighting(
      weightings.imtl_g, num_exits=num_exits, granularity=granularity,
      name="imtl_g")


def aligned_mtl(
    pref_vector: Sequence[float] | jax.Array | None = None,
    scale_mode: str = "min",
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """Aligned-MTL: the preference-weighted sum of the aligned gradients.

  The gradients are replaced by orthogonal ones of equal norm, spanning the
  same space (the condition number of the system made 1), and summed with
  the preferences (:func:`osgd_jax.weightings.aligned_mtl`, TorchJD's
  ``AlignedMTL``).

  Args:
    pref_vector: ``(K,)`` preferences; ``None``: ``1/K`` each.
    scale_mode: the common norm's square: the smallest nonzero eigenvalue of
      M (``"min"``, the paper's), their median (``"median"``) or mean
      (``"rmse"``).
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Raises:
    ValueError: an unknown ``scale_mode``, or a ``pref_vector`` that is not
      K finite numbers.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.aligned_mtl(num_exits=2)
    >>> g = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.5, 0.5]

  References:
    Senushkin, Patakin, Kuznetsov & Konushin, *Independent Component
    Alignment for Multi-Task Learning*, CVPR 2023.
    https://arxiv.org/abs/2305.19000
  """
  name = "aligned_mtl"
  num_exits = aggregation.check_num_exits(num_exits, name)
  aggregation.check_pref_vector(pref_vector, num_exits, name)
  if scale_mode not in weightings.ALIGNED_MTL_SCALE_MODES:
    raise ValueError(
        f"{name}: scale_mode must be one of"
        f" {weightings.ALIGNED_MTL_SCALE_MODES}, got {scale_mode!r}.")
  return aggregation.from_weighting(
      functools.partial(weightings.aligned_mtl, pref_vector=pref_vector,
                        scale_mode=scale_mode),
      num_exits=num_exits, granularity=granularity, name=name)


def krum(
    n_byzantine: int = 0,
    n_selected: int = 1,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """Krum: the gradient(s) nearest their neighbours, robust to outliers.

  ``u`` is the mean of the ``n_selected`` gradients whose summed distances
  to their ``K − n_byzantine − 2`` nearest neighbours are the smallest
  (:func:`osgd_jax.weightings.krum`, TorchJD's ``Krum``). Made for
  Byzantine-robust distributed training, where up to ``n_byzantine``
  gradients may be arbitrary.

  Args:
    n_byzantine: how many gradients may be adversarial, ``≥ 0``; K must be
      at least ``n_byzantine + 3``.
    n_selected: how many gradients to average (Multi-Krum), ``1 ≤ · ≤ K``.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Raises:
    ValueError: ``n_byzantine`` or ``n_selected`` out of range for K.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.krum(num_exits=3)
    >>> g = {"w": jnp.array([[1.0, 0.0], [1.2, 0.0], [-5.0, 4.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"].tolist()
    [1.0, 0.0]

  References:
    Blanchard, El Mhamdi, Guerraoui & Stainer, *Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent*, NeurIPS 2017.
    https://papers.nips.cc/paper/6617
  """
  name = "krum"
  num_exits = aggregation.check_num_exits(num_exits, name)
  if (isinstance(n_byzantine, bool) or not isinstance(n_byzantine, int)
      or n_byzantine < 0):
    raise ValueError(
        f"{name}: n_byzantine must be an int >= 0, got {n_byzantine!r}.")
  aggregation.check_positive_int(n_selected, "n_selected", name)
  if num_exits < n_byzantine + 3 or num_exits < n_selected:
    raise ValueError(
        f"{name} with n_byzantine={n_byzantine} and n_selected={n_selected}"
        f" needs num_exits >= {max(n_byzantine + 3, n_selected)}, got"
        f" num_exits={num_exits}; lower n_byzantine or n_selected.")
  return aggregation.from_weighting(
      functools.partial(weightings.krum, n_byzantine=n_byzantine,
                        n_selected=n_selected),
      num_exits=num_exits, granularity=granularity, name=name)


def dualproj(
    pref_vector: Sequence[float] | jax.Array | None = None,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
    max_iter: int = 100,
    tol: float = weightings.DEFAULT_QP_TOL,
) -> optax.GradientTransformationExtraArgs:
  """DualProj: the mean gradient projected onto the dual cone of all of them.

  ``u`` is the projection of ``Σ_k p_k g_k`` (the mean by default) onto
  ``{v : ⟨v, g_j⟩ ≥ 0 for all j}`` (:func:`osgd_jax.weightings.dualproj`,
  TorchJD's ``DualProj``; GEM's projection), solved exactly under
  ``jax.jit``.

  Properties: non-conflicting (``⟨g_j, u⟩ ≥ 0`` for every j); a mean of
  non-conflicting gradients passes unchanged; invariant to the exits' order
  (uniform preferences); positively homogeneous. The update is a mean: its
  size is that of one gradient.

  Args:
    pref_vector: ``(K,)`` preferences; ``None``: ``1/K`` each.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``.
    max_iter: cap on active-set iterations.
    tol: relative tolerance of the optimality test.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.dualproj(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]   # (0, ½) ⟂ g_1
    [0.0, 0.5]

  References:
    Lopez-Paz & Ranzato, *Gradient Episodic Memory for Continual Learning*,
    NeurIPS 2017. https://arxiv.org/abs/1706.08840
  """
  name = "dualproj"
  num_exits = aggregation.check_num_exits(num_exits, name)
  aggregation.check_pref_vector(pref_vector, num_exits, name)
  check_qp_options(max_iter, tol, name)
  return aggregation.from_weighting(
      functools.partial(weightings.dualproj, pref_vector=pref_vector,
                        max_iter=max_iter, tol=tol),
      num_exits=num_exits, granularity=granularity, name=name)


class GradVacState(NamedTuple):
  """GradVac's weighting state.

  Attributes:
    target: ``(K, K)`` the cosine targets ``φ̂`` (row i: task i's), an EMA
      of the cosines seen; 0 at ``init``.
    key_data: the raw data of the PRNG key that draws the visiting orders
      (as :class:`~osgd_jax.KeyState`'s).
  """

  target: jax.Array
  key_data: jax.Array


def gradvac(
    beta: float = 0.5,
    eps: float = 1e-8,
    seed: int = 0,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """Gradient Vaccine: every pair's cosine raised to a running target.

  As PCGrad, but instead of projecting a conflict away, task i's gradient
  gets the multiple of ``g_j`` that brings their cosine up to the target
  ``φ̂_ij``, an EMA (rate ``beta``) of the cosines seen at earlier steps
  (:func:`osgd_jax.weightings.gradvac`, TorchJD's ``GradVac``). The
  update is the sum of the modified gradients. The targets and the PRNG key
  of the visiting orders live in the state; under ``granularity="leaf"``
  every leaf has its own targets (the paper's per-parameter-group variant)
  and the same key.

  Args:
    beta: the targets' EMA rate, in [0, 1].
    eps: added to the denominators, ``≥ 0``.
    seed: seeds the visiting orders.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the whole model) or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`GradVacState` per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.gradvac(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> updates, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]   # PCGrad at target 0
    [0.5, 1.5]
    >>> state.weighting_state.target.shape   # one group
    (1, 2, 2)

  References:
    Wang, Tsvetkov, Firat & Cao, *Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models*,
    ICLR 2021. https://arxiv.org/abs/2010.05874
  """
  name = "gradvac"
  aggregation.check_unit_interval(beta, "beta", name)
  aggregation.check_nonnegative(eps, "eps", name)

  def init(k):
    return GradVacState(jnp.zeros((k, k), jnp.float32),
                        jax.random.key_data(jax.random.key(seed)))

  def apply(gram, state: GradVacState, **extra_args):
    del extra_args
    key, subkey = jax.random.split(jax.random.wrap_key_data(state.key_data))
    weights, target = weightings.gradvac(
        gram, target=state.target.astype(gram.dtype), key=subkey, beta=beta,
        eps=eps)
    return weights, GradVacState(target, jax.random.key_data(key))

  return aggregation.from_weighting(
      aggregation.StatefulWeighting(init, apply), num_exits=num_exits,
      granularity=granularity, name=name)


def cagrad(
    c: float = 0.4,
    norm_eps: float = 1e-4,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
    bisections: int = 40,
    max_iter: int = 100,
    tol: float = weightings.DEFAULT_QP_TOL,
) -> optax.GradientTransformationExtraArgs:
  """CAGrad: the best worst-case improvement within a ball around the mean.

  ``u = g_0 + c ‖g_0‖ g_w / ‖g_w‖``, the direction within ``c ‖g_0‖`` of the
  mean gradient ``g_0`` that maximises ``min_k ⟨g_k, u⟩``
  (:func:`osgd_jax.weightings.cagrad`, TorchJD's ``CAGrad``), solved under
  ``jax.jit`` by a bisection over simplex QPs, with no convex-solver
  dependency. ``c = 0`` is the mean; as c grows the update approaches
  MGDA's direction. No update when the worst case cannot be improved (e.g.
  an exit with a zero gradient).

  Args:
    c: the ball's radius relative to ``‖g_0‖``, ``≥ 0`` (the paper's 0.4).
    norm_eps: below this ``‖g_w‖``, relative to the gradients' Frobenius
      norm, no update.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.
    bisections: steps of the bisection.
    max_iter: cap on the active-set iterations of each QP.
    tol: relative tolerance of their optimality test.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.cagrad(0.5, num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.75, 0.75]

  References:
    Liu, Liu, Jin, Stone & Liu, *Conflict-Averse Gradient Descent for
    Multi-task Learning*, NeurIPS 2021. https://arxiv.org/abs/2110.14048
  """
  name = "cagrad"
  aggregation.check_nonnegative(c, "c", name)
  aggregation.check_nonnegative(norm_eps, "norm_eps", name)
  aggregation.check_positive_int(bisections, "bisections", name)
  check_qp_options(max_iter, tol, name)
  return aggregation.from_weighting(
      functools.partial(weightings.cagrad, c=c, norm_eps=norm_eps,
                        bisections=bisections, max_iter=max_iter, tol=tol),
      num_exits=num_exits, granularity=granularity, name=name)


def config(
    pref_vector: Sequence[float] | jax.Array | None = None,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """ConFIG: a conflict-free direction with equal cosines to every gradient.

  ``u = (Σ_i ⟨g_i, v̂⟩) v̂`` with ``v = Ĝ⁺ p`` for the unit gradients Ĝ
  (:func:`osgd_jax.weightings.config`, TorchJD's ``ConFIG``), exact from the
  Gram matrix.

  Args:
    pref_vector: ``(K,)`` proportions of the target cosines; ``None``: ones.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.config(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [1.5, 1.5]

  References:
    Liu, Chu & Thuerey, *ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks*, ICLR 2025. https://arxiv.org/abs/2408.11104
  """
  name = "config"
  num_exits = aggregation.check_num_exits(num_exits, name)
  aggregation.check_pref_vector(pref_vector, num_exits, name)
  return aggregation.from_weighting(
      functools.partial(weightings.config, pref_vector=pref_vector),
      num_exits=num_exits, granularity=granularity, name=name)


def fairgrad(
    alpha: float = 1.0,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
    max_iter: int = 50,
) -> optax.GradientTransformationExtraArgs:
  """FairGrad: α-fair weights, ``M w = w^{-1/α}``, solved by Newton under jit.

  The update ``u = wᵀ G`` maximises the α-fair utility of the exits'
  improvements ``⟨g_k, u⟩`` (:func:`osgd_jax.weightings.fairgrad`, TorchJD's
  ``FairGrad``): α = 1 is proportional fairness (Nash-MTL's solution), large
  α approaches max-min fairness, α = 0 the mean.

  Args:
    alpha: the fairness parameter, ``≥ 0`` (TorchJD has no default; the
      paper tunes it in {0.5, 1, 2, 5, ...}).
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.
    max_iter: the Newton steps.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.fairgrad(1.0, num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]   # ⟨g_k, u⟩ = 1/w_k
    [1.0, 1.0]

  References:
    Ban & Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024.
    https://arxiv.org/abs/2402.15638
  """
  name = "fairgrad"
  aggregation.check_nonnegative(alpha, "alpha", name)
  aggregation.check_positive_int(max_iter, "max_iter", name)
  return aggregation.from_weighting(
      functools.partial(weightings.fairgrad, alpha=alpha, max_iter=max_iter),
      num_exits=num_exits, granularity=granularity, name=name)


class SimplexState(NamedTuple):
  """The weights a MoDo or SDMGrad step starts from.

  Attributes:
    iterate: ``(K,)`` on the simplex, ``1/K`` at ``init`` (not named
      ``weights``, which names the applied weights in every state).
  """

  iterate: jax.Array


def _uniform_start(k: int) -> SimplexState:
  return SimplexState(jnp.full((k,), 1.0 / k, jnp.float32))


def modo(
    gamma: float = 0.1,
    rho: float = 0.1,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """MoDo: weights that take one projected-gradient step towards MGDA's per update.

  ``λ ← Π_Δ(λ − γ (M λ + ρ λ))``, ``u = λᵀ G``
  (:func:`osgd_jax.weightings.modo`, TorchJD's ``MoDoWeighting``), λ kept
  in the state. The paper's M pairs two independent mini-batches; on the
  stacked-gradient contract it is the step's ``G Gᵀ``.

  Args:
    gamma: the weights' step size, ``> 0``.
    rho: their ℓ2 regularisation, ``≥ 0``.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`SimplexState` per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.modo(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0 ** 0.5]])}
    >>> _, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in state.weights.tolist()]
    [0.55, 0.45]

  References:
    Chen, Fernando, Ying & Chen, *Three-Way Trade-Off in Multi-Objective
    Learning: Optimization, Generalization and Conflict-Avoidance*, JMLR 25,
    2024. https://arxiv.org/abs/2305.20057
  """
  name = "modo"
  if aggregation.is_checkable_number(gamma) and not gamma > 0:
    raise ValueError(f"{name}: gamma must be > 0, got {gamma!r}.")
  aggregation.check_nonnegative(rho, "rho", name)

  def apply(gram, state: SimplexState, **extra_args):
    del extra_args
    weights = weightings.modo(gram, previous=state.iterate.astype(gram.dtype),
                              gamma=gamma, rho=rho)
    return weights, SimplexState(weights)

  return aggregation.from_weighting(
      aggregation.StatefulWeighting(_uniform_start, apply),
      num_exits=num_exits, granularity=granularity, name=name)


def sdmgrad(
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    lambda_: float = 0.3,
    pref_vector: Sequence[float] | jax.Array | None = None,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """SDMGrad: MGDA's weights pulled towards a preferred direction (the mean).

  ``n_iter`` projected momentum steps on ``½‖(w + λ w̃)ᵀ G‖²`` from the
  previous w, then ``u = (w + λ w̃)ᵀ G / (1 + λ)``
  (:func:`osgd_jax.weightings.sdmgrad`, TorchJD's ``SDMGradWeighting``), w
  kept in the state. As for :func:`modo`, M is the step's ``G Gᵀ``.

  Args:
    lr: the inner step size, ``> 0``.
    momentum: the inner momentum, in [0, 1).
    n_iter: the inner steps.
    lambda_: the pull towards the preferences, ``≥ 0``.
    pref_vector: ``(K,)`` the preferences; ``None``: ``1/K`` each.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`SimplexState` per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.sdmgrad(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.5, 0.5]

  References:
    Xiao, Ban & Ji, *Direction-oriented Multi-objective Learning: Simple and
    Provable Stochastic Algorithms*, NeurIPS 2023.
    https://arxiv.org/abs/2305.18409
  """
  name = "sdmgrad"
  num_exits = aggregation.check_num_exits(num_exits, name)
  if aggregation.is_checkable_number(lr) and not lr > 0:
    raise ValueError(f"{name}: lr must be > 0, got {lr!r}.")
  aggregation.check_fraction(momentum, "momentum", name)
  aggregation.check_positive_int(n_iter, "n_iter", name)
  aggregation.check_nonnegative(lambda_, "lambda_", name)
  aggregation.check_pref_vector(pref_vector, num_exits, name)

  def apply(gram, state: SimplexState, **extra_args):
    del extra_args
    weights, w = weightings.sdmgrad(
        gram, previous=state.iterate.astype(gram.dtype),
        pref_vector=pref_vector, lr=lr, momentum=momentum, n_iter=n_iter,
        lambda_=lambda_)
    return weights, SimplexState(w)

  return aggregation.from_weighting(
      aggregation.StatefulWeighting(_uniform_start, apply),
      num_exits=num_exits, granularity=granularity, name=name)


#: The weightings of :mod:`osgd_jax.weightings` that :func:`crmogm` takes by
#: name: those that need nothing but the Gram matrix.
CRMOGM_WEIGHTINGS = ("upgrad", "mgda", "dualproj", "imtl_g", "aligned_mtl",
                     "cagrad", "config", "fairgrad", "nash_mtl", "pcd", "osgd",
                     "mean", "uniform")


class CRMOGMState(NamedTuple):
  """CR-MOGM's weighting state.

  Attributes:
    smoothed: ``(K,)`` the smoothed weights of the previous update.
    count: the number of updates so far (the first takes the inner weights
      as they are).
    inner: the wrapped weighting's own state (``()`` for a pure one).
  """

  smoothed: jax.Array
  count: jax.Array
  inner: Any


def crmogm(
    weighting: str | weightings.Weighting | aggregation.StatefulWeighting
    = "upgrad",
    alpha: float = 0.9,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """CR-MOGM: any weighting's weights, smoothed by an EMA across steps.

  ``λ_t = α λ_{t−1} + (1 − α) λ̂_t`` with ``λ̂_t`` the wrapped weighting's
  weights, and ``λ_1 = λ̂_1``; ``u = λ_tᵀ G``. The paper shows that this
  smoothing makes stochastic multi-objective gradient manipulation (MGDA,
  UPGrad and kin) converge; TorchJD's ``CRMOGMWeighting``.

  Args:
    weighting: the name of a weighting of :mod:`osgd_jax.weightings` that
      reads the Gram matrix only (``CRMOGM_WEIGHTINGS``: ``"upgrad"``,
      ``"mgda"``, ...), with its defaults; a function ``(K, K) -> (K,)``; or
      a :class:`osgd_jax.StatefulWeighting`.
    alpha: the EMA's weight on the previous weights, in [0, 1]; 0: no
      smoothing.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`CRMOGMState` per group.

  Raises:
    ValueError: an unknown weighting name or ``alpha`` outside [0, 1].

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.crmogm("mgda", alpha=0.5, num_exits=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> for g in ([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 3.0]]):
    ...   _, state = tx.update({"w": jnp.asarray(g)}, state)
    >>> [round(v, 4) for v in state.weights.tolist()]   # ½(½, ½) + ½(0.9, 0.1)
    [0.7, 0.3]

  References:
    Zhou, Zhang, Jiang, Chen, Wang & Xu, *On the Convergence of Stochastic
    Multi-Objective Gradient Manipulation and Beyond*, NeurIPS 2022.
    https://openreview.net/forum?id=ScwfQ7hdwyP
  """
  name = "crmogm"
  aggregation.check_unit_interval(alpha, "alpha", name)
  if isinstance(weighting, str):
    if weighting not in CRMOGM_WEIGHTINGS:
      raise ValueError(
          f"{name}: unknown weighting {weighting!r}; name one of"
          f" {CRMOGM_WEIGHTINGS}, or pass a function (K, K) -> (K,) or an"
          " osgd_jax.StatefulWeighting.")
    weighting = getattr(weightings, weighting)
  inner = (weighting if isinstance(weighting, aggregation.StatefulWeighting)
           else aggregation.stateless(weighting))

  def init(k):
    return CRMOGMState(jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.int32),
                       inner.init(k))

  def apply(gram, state: CRMOGMState, **extra_args):
    fresh, inner_state = inner.apply(gram, state.inner, **extra_args)
    previous = state.smoothed.astype(gram.dtype)
    weights = jnp.where(state.count == 0, fresh,
                        alpha * previous + (1.0 - alpha) * fresh)
    return weights, CRMOGMState(weights, optax.safe_increment(state.count),
                                inner_state)

  return aggregation.from_weighting(
      aggregation.StatefulWeighting(init, apply), num_exits=num_exits,
      granularity=granularity, name=name)


class PCDState(NamedTuple):
  """PCD's weighting state.

  Attributes:
    sq_norm_ema: ``(K,)`` the EMA of the exits' squared gradient norms.
    count: the number of updates so far (for the EMA's bias correction).
  """

  sq_norm_ema: jax.Array
  count: jax.Array


def pcd(
    tau: float | Sequence[float] = 0.02,
    beta: float = 0.999,
    eps: float = 1e-8,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
    max_iter: int = 100,
    tol: float = weightings.DEFAULT_QP_TOL,
) -> optax.GradientTransformationExtraArgs:
  """PCD: follow exit 1's gradient, guaranteeing each other exit some progress.

  Exit 1 (the first row; reorder the exits to choose another) is the
  primary objective: the update is the closest direction to its normalised
  gradient that gives every other exit at least the fraction ``tau`` of the
  progress of a step along its own normalised gradient, rescaled to
  ``‖g_1‖`` (:func:`osgd_jax.weightings.pcd`, TorchJD's ``PCD``). Each
  gradient is normalised by ``1/√(v̂_i + eps)``, v̂ the bias-corrected EMA
  (decay ``beta``) of its squared norm, kept in the state. For anytime
  networks, a natural choice is the exit that must be best (the last:
  reverse the exits) or the one served most.

  Args:
    tau: the guaranteed fraction, in [0, 1]: one number or K−1.
    beta: the EMA's decay, in [0, 1).
    eps: added to the EMA before its inverse square root, ``≥ 0``.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``.
    max_iter: cap on the active-set iterations.
    tol: relative tolerance of the optimality test.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`PCDState` per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.pcd(tau=0.0, num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]   # g_1's size, ⟂ g_2
    [0.7071, 0.7071]

  References:
    Varam et al., *Not All Objectives Are Born Equal: Priority-Constrained
    Descent for Hierarchical Multi-Objective Optimization*, TMLR 2026.
    https://openreview.net/forum?id=HT01yGHLEt
  """
  name = "pcd"
  num_exits = aggregation.check_num_exits(num_exits, name)
  if not isinstance(tau, jax.Array):
    taus = np.asarray(tau, np.float64).reshape(-1)
    if taus.shape not in ((1,), (num_exits - 1,)) or not np.all(
        (taus >= 0) & (taus <= 1)):
      raise ValueError(
          f"{name}: tau must be one number or {num_exits - 1} (one per"
          f" secondary exit), each in [0, 1]; got {tau!r}.")
  aggregation.check_fraction(beta, "beta", name)
  aggregation.check_nonnegative(eps, "eps", name)
  check_qp_options(max_iter, tol, name)

  def init(k):
    return PCDState(jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.int32))

  def apply(gram, state: PCDState, **extra_args):
    del extra_args
    sq_norms = jnp.maximum(jnp.diagonal(gram), 0.0)
    count = optax.safe_increment(state.count)
    ema = beta * state.sq_norm_ema.astype(gram.dtype) + (1 - beta) * sq_norms
    debiased = ema / (1 - jnp.asarray(beta, gram.dtype) ** count)
    scales = gram_lib.safe_inverse(jnp.sqrt(debiased + eps))
    weights = weightings.pcd(gram, scales=scales, tau=tau, max_iter=max_iter,
                             tol=tol)
    # A non-finite gradient leaves the EMA as it was (and the update NaN).
    finite = jnp.all(jnp.isfinite(gram))
    return weights, PCDState(
        jnp.where(finite, ema, state.sq_norm_ema.astype(gram.dtype)),
        jnp.where(finite, count, state.count))

  return aggregation.from_weighting(
      aggregation.StatefulWeighting(init, apply), num_exits=num_exits,
      granularity=granularity, name=name)


class NashMTLState(NamedTuple):
  """Nash-MTL's weighting state.

  Attributes:
    alpha: ``(K,)`` the bargaining weights last solved for (before the norm
      clipping), reused between updates.
    count: the number of updates so far.
  """

  alpha: jax.Array
  count: jax.Array


def nash_mtl(
    max_norm: float = 1.0,
    update_weights_every: int = 1,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
    max_iter: int = 50,
) -> optax.GradientTransformationExtraArgs:
  """Nash-MTL: the exits' Nash bargaining solution, norm-clipped.

  ``u = αᵀ G`` with ``⟨g_k, u⟩ = 1/α_k`` on the Frobenius-normalised Gram
  matrix, clipped to norm ``max_norm``
  (:func:`osgd_jax.weightings.nash_mtl`, TorchJD's ``NashMTL`` with its
  defaults). α is solved for every ``update_weights_every`` updates and
  reused in between, as the paper does to save time; here that saves
  little, since the solve is a few K×K Newton steps under ``jax.jit``
  (TorchJD's needs cvxpy).

  Args:
    max_norm: the largest norm of the update, ``≥ 0``; 0: unbounded.
    update_weights_every: solve for α every this many updates.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.
    max_iter: the Newton steps.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`NashMTLState` per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.nash_mtl(num_exits=2)
    >>> g = {"w": jnp.array([[0.1, 0.0], [0.0, 0.2]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.2031, 0.2031]

  References:
    Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022.
    https://arxiv.org/abs/2202.01017
  """
  name = "nash_mtl"
  aggregation.check_nonnegative(max_norm, "max_norm", name)
  aggregation.check_positive_int(update_weights_every, "update_weights_every",
                                 name)
  aggregation.check_positive_int(max_iter, "max_iter", name)

  def init(k):
    return NashMTLState(jnp.ones((k,), jnp.float32), jnp.zeros((), jnp.int32))

  def apply(gram, state: NashMTLState, **extra_args):
    del extra_args
    solve = state.count % update_weights_every == 0
    fresh = weightings.nash_mtl(gram, max_norm=0.0, max_iter=max_iter)
    alpha = jnp.where(solve, fresh, state.alpha.astype(gram.dtype))
    weights = weightings.clip_update_norm(gram, alpha, max_norm)
    return weights, NashMTLState(alpha, optax.safe_increment(state.count))

  return aggregation.from_weighting(
      aggregation.StatefulWeighting(init, apply), num_exits=num_exits,
      granularity=granularity, name=name)


# --- aggregators of the gradients themselves, coordinate by coordinate -------
