"""Independent float64 NumPy references for tests (unused by the library)."""

from __future__ import annotations

import itertools

import numpy as np


def gram_schmidt_components(
  rows, tol: float, order=None, rescale: bool = False
):
  """Classical Gram–Schmidt in float64, straight from the definition.

  Args:
    rows: (K, N) array-like, one flattened gradient per exit.
    tol: a component with ‖ĝ_k‖² ≤ tol·‖g_k‖² is degenerate (dropped).
    order: priority order of the exits (default range(K)).
    rescale: scale each kept component to the norm of its input row.

  Returns:
    (K, N) components in input order; dropped components are zero rows.
  """
  g = np.asarray(rows, np.float64).reshape(len(rows), -1)
  order = range(len(g)) if order is None else order
  basis = []
  components = np.zeros_like(g)
  for k in order:
    v = g[k].copy()
    for b in basis:
      v = v - (g[k] @ b) / (b @ b) * b
    in_sq, out_sq = g[k] @ g[k], v @ v
    if in_sq > 0 and out_sq > tol * in_sq:
      basis.append(v)
      components[k] = v * (np.sqrt(in_sq / out_sq) if rescale else 1.0)
  return components


def osgd_direction(
  leaves, *, tol, granularity="leaf", order=None, rescale=False
):
  """Reference OSGD update for a list of stacked leaves (K, *shape)."""
  leaves = [np.asarray(x, np.float64) for x in leaves]
  if granularity == "leaf":
    return [
      gram_schmidt_components(x.reshape(len(x), -1), tol, order, rescale)
      .sum(0)
      .reshape(x.shape[1:])
      for x in leaves
    ]
  flat = np.concatenate([x.reshape(len(x), -1) for x in leaves], axis=1)
  total = gram_schmidt_components(flat, tol, order, rescale).sum(0)
  out, start = [], 0
  for x in leaves:
    size = int(np.prod(x.shape[1:]))
    out.append(total[start : start + size].reshape(x.shape[1:]))
    start += size
  return out


# --- baselines (tests/aggregation/test_<method>.py) -------------------------
# Each works on the gradient vectors themselves, in float64, from the paper's
# definition; none uses the Gram-matrix formulations of osgd_jax.aggregation.


def _flat_rows(leaves, granularity):
  """[(K, N) float64 rows per group], for per-leaf or global aggregation."""
  flats = [np.asarray(x, np.float64).reshape(len(x), -1) for x in leaves]
  return flats if granularity == "leaf" else [np.concatenate(flats, axis=1)]


def _split_like(vectors, leaves, granularity):
  """Inverse of _flat_rows for one vector per group: param-shaped arrays."""
  if granularity == "leaf":
    return [
      v.reshape(np.shape(x)[1:]) for v, x in zip(vectors, leaves, strict=True)
    ]
  out, start = [], 0
  for x in leaves:
    size = int(np.prod(np.shape(x)[1:]))
    out.append(vectors[0][start : start + size].reshape(np.shape(x)[1:]))
    start += size
  return out


def aggregate(leaves, direction, granularity="global"):
  """``direction((K, N) rows) -> (N,)`` per group, as a param-shaped output."""
  rows = _flat_rows(leaves, granularity)
  return _split_like([direction(r) for r in rows], leaves, granularity)


def adaloss_weights(loss_history, decay):
  """AdaLoss weights after the losses in ``loss_history`` (T, K), in order.

  EMA started at the first losses; weights 1/EMA normalised to sum to K.
  """
  ema = None
  for losses in np.asarray(loss_history, np.float64):
    ema = losses if ema is None else decay * ema + (1 - decay) * losses
  inverse = 1 / ema
  return len(ema) * inverse / inverse.sum()


def pcgrad_direction(rows, orders):
  """Yu et al. (2020), Algorithm 1, with the given visiting order per task.

  For each task i, g_i^PC starts at g_i; the other tasks j are visited in
  ``orders[i]``, and g_i^PC is projected on the normal plane of the original
  g_j whenever the current g_i^PC conflicts with it. Returns Σ_i g_i^PC.
  """
  g = np.asarray(rows, np.float64)
  total = np.zeros(g.shape[1])
  for i in range(len(g)):
    pc = g[i].copy()
    for j in orders[i]:
      if j == i:
        continue
      dot = pc @ g[j]
      if dot < 0:
        pc = pc - dot / (g[j] @ g[j]) * g[j]
    total += pc
  return total


def min_norm_point(rows):
  """The minimum-norm point of the convex hull of the rows (MGDA's direction).

  Enumerates the faces: for every subset S of rows, the min-norm point of
  their affine hull (least squares), kept if its barycentric coordinates
  are non-negative. By Carathéodory the optimum is the min-norm point of an
  affinely independent subset, found exactly; every other kept point lies in
  the hull, so the smallest one is the answer.
  """
  g = np.asarray(rows, np.float64)
  k = len(g)
  best, best_sq = None, np.inf
  for size in range(1, k + 1):
    for subset in itertools.combinations(range(k), size):
      p = g[list(subset)]
      # Points p_0 + Σ_s β_s (p_s − p_0); minimise ‖·‖ over β by least squares.
      base, dirs = p[0], (p[1:] - p[0]).T
      beta = (
        np.linalg.lstsq(dirs, -base, rcond=None)[0] if size > 1 else np.zeros(0)
      )
      alpha = np.concatenate([[1 - beta.sum()], beta])
      if np.any(alpha < -1e-12):
        continue
      point = alpha @ p
      if point @ point < best_sq:
        best, best_sq = point, point @ point
  return best


def dual_cone_projection(rows, v):
  """Euclidean projection of v onto {x : ⟨x, r⟩ ≥ 0 for every row r}.

  The projection lies on a face {x : R_A x = 0} of the cone, and is the
  projection of v onto that subspace. Enumerating the active sets A, the
  feasible candidate nearest to v is the answer (every candidate is in the
  cone, and the true face is among them).
  """
  r = np.asarray(rows, np.float64)
  v = np.asarray(v, np.float64)
  scale = np.linalg.norm(r, axis=1) * max(np.linalg.norm(v), 1e-300)
  best, best_dist = None, np.inf
  for size in range(len(r) + 1):
    for active in itertools.combinations(range(len(r)), size):
      if active:
        a = r[list(active)].T  # columns span the active normals
        x = v - a @ np.linalg.lstsq(a, v, rcond=None)[0]
      else:
        x = v
      if np.all(r @ x >= -1e-9 * scale):
        dist = np.linalg.norm(x - v)
        if dist < best_dist:
          best, best_dist = x, dist
  return best


def upgrad_direction(rows):
  """UPGrad: the mean of every row's projection onto the rows' dual cone."""
  g = np.asarray(rows, np.float64)
  return np.mean([dual_cone_projection(g, gi) for gi in g], axis=0)


def sdn_weights(num_exits, step, total_steps, cap):
  """SDN schedule (Kaya et al. 2019): τ_k = min(c_k, 0.01 + c_k·t/T), last 1."""
  caps = cap * np.arange(1, num_exits) / (num_exits - 1)
  early = np.minimum(caps, 0.01 + caps * step / total_steps)
  return np.concatenate([early, [1.0]])


# --- the other aggregators of TorchJD (tests/aggregation/test_<method>.py) ----
# From the papers' definitions, on the gradient rows, in float64.


def _rank_cutoff(values_sq, k):
  """Squared singular values above K·eps·max count (NumPy's matrix_rank)."""
  return values_sq > k * np.finfo(np.float64).eps * values_sq.max(initial=0.0)


def imtl_g_direction(rows):
  """IMTL-G (Liu et al. 2021): equal projections of u on the unit gradients.

  Independent nonzero rows: the paper's closed form, α_{2:} = g_1 Uᵀ (D Uᵀ)⁻¹
  with D = [g_1 − g_k], U = [u_1 − u_k] (u_k = g_k/‖g_k‖), α_1 = 1 − Σ α_{2:}.
  Dependent rows: Quinton & Rey's generalisation, the least-squares solution
  of minimum norm of M α = d (d_k = ‖g_k‖), normalised to sum to 1.
  """
  g = np.asarray(rows, np.float64)
  norms = np.linalg.norm(g, axis=1)
  live = np.flatnonzero(norms > 0)
  sub = g[live]
  s = np.linalg.svd(sub / norms[live, None], compute_uv=False)
  if len(live) > 1 and np.all(_rank_cutoff(s**2, len(g))):
    units = sub / norms[live, None]
    d, u = sub[0] - sub[1:], units[0] - units[1:]
    tail = sub[0] @ u.T @ np.linalg.inv(d @ u.T)
    alpha = np.concatenate([[1 - tail.sum()], tail])
    return alpha @ sub
  m = g @ g.T
  v = np.linalg.lstsq(m, norms, rcond=len(g) * np.finfo(np.float64).eps)[0]
  return v / v.sum() @ g if abs(v.sum()) > 1e-300 else np.zeros(g.shape[1])


def aligned_mtl_direction(rows, pref=None, scale_mode="min"):
  """Aligned-MTL (Senushkin et al. 2023, Algorithm 1), from the SVD of G.

  G = U Σ Vᵀ over the nonzero singular values; the aligned gradients are
  √λ · U Vᵀ with λ the smallest (or median, or mean) σ²; u = pᵀ of them.
  """
  g = np.asarray(rows, np.float64)
  k = len(g)
  pref = np.full(k, 1.0 / k) if pref is None else np.asarray(pref)
  u, s, vt = np.linalg.svd(g, full_matrices=False)
  keep = _rank_cutoff(s**2, k)
  if not keep.any():
    return pref @ g
  lam = np.sort(s[keep] ** 2)
  scale = {
    "min": lam[0],
    "median": lam[(len(lam) - 1) // 2],
    "rmse": lam.mean(),
  }[scale_mode]
  aligned = np.sqrt(scale) * u[:, keep] @ vt[keep]
  return pref @ aligned


def krum_direction(rows, n_byzantine, n_selected=1):
  """(Multi-)Krum as TorchJD defines it: sums of Euclidean distances.

  Each row's score sums its distances to its K − f − 2 nearest other rows;
  the mean of the n_selected lowest-scored rows (ties: lower index).
  """
  g = np.asarray(rows, np.float64)
  k = len(g)
  dist = np.linalg.norm(g[:, None] - g[None], axis=-1)
  scores = [
    np.sort(np.delete(dist[i], i))[: k - n_byzantine - 2].sum()
    for i in range(k)
  ]
  chosen = np.argsort(scores, kind="stable")[:n_selected]
  return g[chosen].mean(axis=0)


def dualproj_direction(rows, pref=None):
  """DualProj: the preference-weighted sum projected onto the dual cone."""
  g = np.asarray(rows, np.float64)
  pref = np.full(len(g), 1.0 / len(g)) if pref is None else np.asarray(pref)
  return dual_cone_projection(g, pref @ g)


def gradvac_direction(rows, orders, target, beta=0.5, eps=1e-8):
  """GradVac (Wang et al. 2021, Algorithm 1 with eps): (direction, new targets).

  Task i visits the others in ``orders[i]``; φ = cos(g_i^GV, g_j); if below
  the target φ̂_ij, g_i^GV += ‖g_i^GV‖(φ̂√(1−φ²) − φ√(1−φ̂²))/(‖g_j‖√(1−φ̂²))
  g_j; then φ̂_ij ← (1−β)φ̂_ij + βφ.
  """
  g = np.asarray(rows, np.float64)
  target = np.array(target, np.float64)
  total = np.zeros(g.shape[1])
  for i in range(len(g)):
    v = g[i].copy()
    for j in orders[i]:
      if j == i:
        continue
      nv, nj = np.linalg.norm(v), np.linalg.norm(g[j])
      phi, hat = v @ g[j] / (nv * nj + eps), target[i, j]
      if phi < hat:
        sin_phi = np.sqrt(max(1 - phi**2, 0.0))
        sin_hat = np.sqrt(max(1 - hat**2, 0.0))
        v = (
          v + nv * (hat * sin_phi - phi * sin_hat) / (nj * sin_hat + eps) * g[j]
        )
      target[i, j] = (1 - beta) * hat + beta * phi
    total += v
  return total, target


def cagrad_direction(rows, c, norm_eps=1e-4):
  """CAGrad (Liu et al. 2021, Algorithm 1) by SciPy's SLSQP from several starts.

  d = g_0 + c‖g_0‖ g_w/‖g_w‖, w minimising ⟨g_w, g_0⟩ + c‖g_0‖‖g_w‖ on the
  simplex; 0 when ‖g_w‖ < norm_eps · ‖G‖_F (TorchJD's rule, no direction).
  """
  from scipy import optimize  # pylint: disable=import-outside-toplevel

  g = np.asarray(rows, np.float64)
  k = len(g)
  frobenius = np.linalg.norm(g)
  g = g / frobenius
  g0 = g.mean(axis=0)
  radius = c * np.linalg.norm(g0)

  def objective(w):
    return (w @ g) @ g0 + radius * np.linalg.norm(w @ g)

  simplex = [{"type": "eq", "fun": lambda w: w.sum() - 1}]
  starts = [np.full(k, 1.0 / k)] + list(0.7 * np.eye(k) + 0.3 / k)
  best = min(
    (
      optimize.minimize(
        objective,
        x0,
        method="SLSQP",
        bounds=[(0, 1)] * k,
        constraints=simplex,
        options={"ftol": 1e-15, "maxiter": 1000},
      )
      for x0 in starts
    ),
    key=lambda r: r.fun,
  )
  gw = best.x @ g
  if np.linalg.norm(gw) < norm_eps:
    return np.zeros(g.shape[1])
  return frobenius * (g0 + radius * gw / np.linalg.norm(gw))


def config_direction(rows, pref=None):
  """ConFIG (Liu et al. 2025): v = Ĝ⁺ p on unit rows, u = (Σ_i ⟨g_i, v̂⟩) v̂."""
  g = np.asarray(rows, np.float64)
  pref = np.ones(len(g)) if pref is None else np.asarray(pref)
  norms = np.linalg.norm(g, axis=1)
  units = np.divide(
    g, norms[:, None], out=np.zeros_like(g), where=norms[:, None] > 0
  )
  v = np.linalg.pinv(units) @ pref
  if not np.any(v):
    return np.zeros(g.shape[1])
  unit = v / np.linalg.norm(v)
  return (g @ unit).sum() * unit


def fairgrad_residual(gram, weights, alpha):
  """FairGrad (Ban & Ji 2024, Eq. 4), M w = w^{-1/α}: the relative residual.

  The positive solution is unique (if x ≠ y solve it, (x − y)ᵀM(x − y) ≥ 0
  but (x − y)ᵀ(x^{-1/α} − y^{-1/α}) < 0), so a small residual identifies it.
  """
  m = np.asarray(gram, np.float64)
  w = np.asarray(weights, np.float64)
  assert np.all(w > 0), w
  return np.max(np.abs((m @ w) * w ** (1 / alpha) - 1))


def simplex_projection(y):
  """Euclidean projection onto the simplex, by bisection on the threshold."""
  y = np.asarray(y, np.float64)
  lo, hi = y.min() - 1.0, y.max()
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if np.maximum(y - mid, 0).sum() > 1 else (lo, mid)
  return np.maximum(y - 0.5 * (lo + hi), 0)


def modo_weights(grams, gamma, rho):
  """MoDo's weights after the given steps: λ ← Π_Δ(λ − γ(Mλ + ρλ)), from 1/K."""
  lam = np.full(len(grams[0]), 1.0 / len(grams[0]))
  for m in grams:
    lam = simplex_projection(lam - gamma * (m @ lam + rho * lam))
  return lam


def sdmgrad_weights(grams, lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3):
  """SDMGrad's last weights (w + λ w̃)/(1 + λ), w carried over the steps."""
  k = len(grams[0])
  target = np.full(k, 1.0 / k)
  w = target.copy()
  for m in grams:
    a = m / (np.mean(np.sqrt(np.maximum(np.diag(m), 0))) ** 2 + 1e-8)
    velocity = np.zeros(k)
    for _ in range(n_iter):
      velocity = momentum * velocity + a @ (w + lambda_ * target)
      w = simplex_projection(w - lr * velocity)
  return (w + lambda_ * target) / (1 + lambda_)


def pcd_direction(rows, tau):
  """PCD on the unit rows: min ½‖d − ĝ_1‖², ⟨ĝ_j, d⟩ ≥ τ for j ≥ 2, by KKT.

  Every active set A is tried: d = ĝ_1 + Σ_A μ_j ĝ_j with the constraints of
  A tight; the candidate with μ ≥ 0 satisfying all constraints is the
  optimum (a strictly convex QP). None: infeasible, g_1. d is rescaled to
  ‖g_1‖.
  """
  g = np.asarray(rows, np.float64)
  norms = np.linalg.norm(g, axis=1)
  units = g / norms[:, None]
  sec = units[1:]
  for size in range(len(sec) + 1):
    for active in itertools.combinations(range(len(sec)), size):
      a = sec[list(active)]
      if size and np.linalg.matrix_rank(a) < size:
        continue  # dependent constraints: another active set has them
      mu = np.linalg.solve(a @ a.T, tau - a @ units[0]) if size else np.zeros(0)
      d = units[0] + mu @ a
      if np.all(mu >= -1e-12) and np.all(sec @ d >= tau - 1e-9):
        return d * norms[0] / np.linalg.norm(d)
  return g[0]


def trimmed_mean_direction(rows, trim_number):
  """Coordinate-wise trimmed mean (Yin et al. 2018): drop extremes, average."""
  g = np.sort(np.asarray(rows, np.float64), axis=0)
  return g[trim_number : len(g) - trim_number].mean(axis=0)


def excess_mtl_updates(steps, robust_step_size, n_warmup_steps):
  """ExcessMTL (He et al. 2024, Eqs. 6–9 and Section 3.2) over the steps' rows.

  Returns the update of every step.
  """
  steps = [np.asarray(r, np.float64) for r in steps]
  k = len(steps[0])
  weights = np.full(k, 1.0 / k)
  sums = np.zeros_like(steps[0])
  baseline, warmup, outs = None, np.zeros(k), []
  for t, rows in enumerate(steps):
    sums = sums + rows**2
    risk = (rows**2 / np.sqrt(sums + 1e-7)).sum(axis=1)
    if t < n_warmup_steps:
      warmup += risk
    else:
      if baseline is None:
        baseline = warmup / n_warmup_steps if n_warmup_steps else risk
        scaled = risk / (baseline + 1e-7) if n_warmup_steps else risk
      else:
        scaled = risk / (baseline + 1e-7)
      logits = np.log(weights) + robust_step_size * scaled
      weights = np.exp(logits - logits.max())
      weights /= weights.sum()
    outs.append(weights @ rows)
  return outs


# --- language models (tests/test_anytime_tokens.py) ------------------------


def token_early_exit(logits, labels, thresholds, flops):
  """CALM-style exit of each token, in float64, one token at a time.

  Args:
    logits: (K, ..., C) stacked exit logits.
    labels: the logits' shape without the exit and class axes.
    thresholds: (T,) confidences.
    flops: (K,) FLOPs per token of each exit.

  Returns:
    dict of (T,) arrays: mean_exit, mean_flops, bits (log2 loss of the
    answering exit per token), accuracy; and counts (T, K).
  """
  logits = np.asarray(logits, np.float64)
  k, classes = logits.shape[0], logits.shape[-1]
  rows = logits.reshape(k, -1, classes)
  labels = np.asarray(labels).reshape(-1)
  out = {name: [] for name in ("mean_exit", "mean_flops", "bits", "accuracy")}
  out["counts"] = []
  for t in thresholds:
    exits, bits, hits = [], [], []
    for m, label in enumerate(labels):
      for j in range(k):
        p = np.exp(rows[j, m] - rows[j, m].max())
        p /= p.sum()
        if p.max() >= t or j == k - 1:
          exits.append(j)
          bits.append(-np.log2(p[label]))
          hits.append(float(np.argmax(p) == label))
          break
    exits = np.asarray(exits)
    out["mean_exit"].append(np.mean(exits + 1))
    out["mean_flops"].append(np.mean(np.asarray(flops, np.float64)[exits]))
    out["bits"].append(np.mean(bits))
    out["accuracy"].append(np.mean(hits))
    out["counts"].append(np.bincount(exits, minlength=k))
  return {name: np.asarray(v) for name, v in out.items()}


def bits_per_token(logits, labels):
  """(K,) mean -log2 softmax probability of each label, per exit, float64."""
  logits = np.asarray(logits, np.float64)
  k = logits.shape[0]
  rows = logits.reshape(k, -1, logits.shape[-1])
  labels = np.asarray(labels).reshape(-1)
  out = np.zeros(k)
  for j in range(k):
    for m, label in enumerate(labels):
      z = rows[j, m] - rows[j, m].max()
      out[j] -= (z[label] - np.log(np.exp(z).sum())) / np.log(2)
  return out / len(labels)


def nash_mtl_direction(rows, max_norm=1.0, normalise=True):
  """Nash-MTL (Navon et al. 2022): ⟨g_k, d⟩ = 1/α_k on M/‖M‖_F, norm-clipped.

  α minimises the strictly convex ½ αᵀM̄α − Σ_k log α_k, whose stationarity
  is the bargaining equation M̄α = 1/α, by Newton's method (backtracking
  far from the optimum, full steps near it) in float64. Zero rows, whose
  equation has no solution and whose weight multiplies nothing, are left
  out. ``normalise=False, max_norm=0`` is
  FairGrad with α = 1 (Ban & Ji 2024).
  """
  g = np.asarray(rows, np.float64)
  m = g @ g.T
  live = np.diagonal(m) > 0
  if not live.any():
    return np.zeros(g.shape[1])
  sub = m[np.ix_(live, live)]
  if normalise:
    sub = sub / np.linalg.norm(m)

  def objective(a):
    return 0.5 * a @ sub @ a - np.log(a).sum()

  a = 1.0 / np.sqrt(np.diagonal(sub))
  for _ in range(100):
    grad = sub @ a - 1.0 / a
    step = np.linalg.solve(sub + np.diag(1.0 / a**2), grad)
    decrement = grad @ step  # the Newton decrement, squared
    t = 1.0
    if decrement > 1e-12:  # far from the optimum: backtrack (Armijo)
      while (
        np.any(a - t * step <= 0)
        or objective(a - t * step) > objective(a) - 0.25 * t * decrement
      ):
        t /= 2
    a = a - t * step  # near it: full steps, quadratic convergence
    if decrement < 1e-30:
      break
  d = a @ g[live]
  norm = np.linalg.norm(d)
  if max_norm > 0 and norm > max_norm:
    d = d * max_norm / norm
  return d
