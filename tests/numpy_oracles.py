"""Independent float64 NumPy references for the tests (not used by the library)."""

from __future__ import annotations

import numpy as np


def gram_schmidt_components(rows, tol: float, order=None, rescale: bool = False):
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


def osgd_direction(leaves, *, tol, granularity="leaf", order=None, rescale=False):
  """Reference OSGD update for a list of stacked leaves (K, *shape)."""
  leaves = [np.asarray(x, np.float64) for x in leaves]
  if granularity == "leaf":
    return [
        gram_schmidt_components(x.reshape(len(x), -1), tol, order, rescale)
        .sum(0).reshape(x.shape[1:])
        for x in leaves
    ]
  flat = np.concatenate([x.reshape(len(x), -1) for x in leaves], axis=1)
  total = gram_schmidt_components(flat, tol, order, rescale).sum(0)
  out, start = [], 0
  for x in leaves:
    size = int(np.prod(x.shape[1:]))
    out.append(total[start:start + size].reshape(x.shape[1:]))
    start += size
  return out
