"""Writes TorchJD's outputs on seeded Jacobians to ``torchjd_golden.json``.

The tests compare the JAX weightings with this file (each method's
``tests/aggregation/test_<method>.py``, through
``tests/aggregation/gram_cases.py``) so that the suite never imports torch.
Regenerate it, with torch (the CPU build) and the TorchJD version named in
the file installed, with the extras its CAGrad and Nash-MTL need
(``pip install "torchjd[cagrad,nash_mtl]"``: cvxpy and ecos), by::

  python tests/golden/make_torchjd_golden.py

Each deterministic aggregator is run once on every Jacobian of ``CASES``; a
stateful one on a sequence of Jacobians (``SEQUENCES``), from a fresh
instance, so that its state (an EMA) is exercised. Aggregators that draw
random numbers are left out, but GradVac and PCGrad with K = 2, where every
task has one other to visit, are deterministic. The Jacobians are stored
with the outputs, so the tests read them rather than regenerate them.
"""

from __future__ import annotations

import json
import os
from importlib import metadata

import numpy as np
import torch
from torchjd import aggregation as agg

K, N = 4, 6
OUT = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "torchjd_golden.json"
)


def _short(x):
  """Floats to 12 significant digits: a smaller file, still 1e-12 exact."""
  return np.vectorize(lambda v: float(f"{v:.12g}"))(np.asarray(x, np.float64))


def _cases() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(20)
  random = rng.normal(size=(K, N))
  conflicting = rng.normal(size=(K, N))
  conflicting[1:] -= 0.9 * conflicting[0]
  # Rounded before the dependent rows are formed, so that they stay
  # dependent to the last bit (and are not rounded again).
  rank_deficient = _short(rng.normal(size=(K, N)))
  rank_deficient[2] = 1.5 * rank_deficient[0] - 0.5 * rank_deficient[1]
  rank_deficient[3] = -2.0 * rank_deficient[1]
  zero_row = rng.normal(size=(K, N))
  zero_row[1] = 0.0
  mixed_scale = rng.normal(size=(K, N)) * 10.0 ** np.array(
    [[-8.0], [-2.0], [3.0], [8.0]]
  )
  # Rounded before TorchJD sees them, so that the file holds its inputs.
  return {
    "random": _short(random),
    "conflicting": _short(conflicting),
    "rank_deficient": rank_deficient,
    "zero_row": _short(zero_row),
    "mixed_scale": _short(mixed_scale),
  }


# name -> (constructor, its arguments as stored in the file).
AGGREGATORS = {
  "mean": (agg.Mean, {}),
  "sum": (agg.Sum, {}),
  "constant": (
    lambda: agg.Constant(
      torch.tensor([1.0, 0.5, 2.0, -1.0], dtype=torch.float64)
    ),
    {"weights": [1.0, 0.5, 2.0, -1.0]},
  ),
  "imtl_g": (agg.IMTLG, {}),
  "aligned_mtl": (agg.AlignedMTL, {}),
  "aligned_mtl_median": (
    lambda: agg.AlignedMTL(scale_mode="median"),
    {"scale_mode": "median"},
  ),
  "aligned_mtl_rmse": (
    lambda: agg.AlignedMTL(scale_mode="rmse"),
    {"scale_mode": "rmse"},
  ),
  "krum": (lambda: agg.Krum(n_byzantine=0), {"n_byzantine": 0}),
  "multi_krum": (
    lambda: agg.Krum(n_byzantine=0, n_selected=2),
    {"n_byzantine": 0, "n_selected": 2},
  ),
  "dualproj": (agg.DualProj, {}),
  "upgrad": (agg.UPGrad, {}),
  "mgda": (agg.MGDA, {}),
  "config": (agg.ConFIG, {}),
  "fairgrad": (lambda: agg.FairGrad(alpha=1.0), {"alpha": 1.0}),
  "fairgrad_2": (lambda: agg.FairGrad(alpha=2.0), {"alpha": 2.0}),
  "trimmed_mean": (lambda: agg.TrimmedMean(trim_number=1), {"trim_number": 1}),
  # Needs cvxpy.
  "cagrad": (lambda: agg.CAGrad(c=0.4), {"c": 0.4}),
}


def _sequences() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(21)
  pairs = rng.normal(size=(4, 2, N))
  pairs[:, 1] -= 0.7 * pairs[:, 0]  # the pairs conflict
  steps = rng.normal(size=(4, K, N))
  steps[:, 1:] -= 0.6 * steps[:, :1]
  return {"pairs": _short(pairs), "steps": _short(steps)}


# name -> (constructor, its arguments, the sequence it runs on).
STATEFUL = {
  "gradvac": (agg.GradVac, {"beta": 0.5, "eps": 1e-8}, "pairs"),
  "pcgrad": (agg.PCGrad, {}, "pairs"),  # K = 2: one order
  "pcd": (agg.PCD, {"tau": 0.02, "beta": 0.999, "eps": 1e-8}, "steps"),
  "pcd_tau": (agg.PCD, {"tau": 0.5, "beta": 0.9, "eps": 1e-8}, "steps"),
  # MoDo and SDMGrad weigh a K×K matrix (J_1 J_2ᵀ in their papers): given
  # the Gramian J Jᵀ, as the JAX transforms have one batch.
  "modo": (
    lambda **kw: _on_gramian(agg.MoDoWeighting(**kw)),
    {"gamma": 0.1, "rho": 0.1},
    "steps",
  ),
  "sdmgrad": (
    lambda **kw: _on_gramian(agg.SDMGradWeighting(**kw)),
    {"lr": 10.0, "momentum": 0.5, "n_iter": 20, "lambda_": 0.3},
    "steps",
  ),
  "excess_mtl": (
    agg.ExcessMTL,
    {"robust_step_size": 1.0, "n_warmup_steps": 0},
    "steps",
  ),
  "excess_mtl_warmup": (
    agg.ExcessMTL,
    {"robust_step_size": 0.5, "n_warmup_steps": 2},
    "steps",
  ),
  "crmogm_upgrad": (
    lambda **kw: agg.GramianWeightedAggregator(
      agg.CRMOGMWeighting(agg.UPGradWeighting(), **kw)
    ),
    {"alpha": 0.9},
    "steps",
  ),
  # Needs cvxpy and ecos.
  "nash_mtl": (
    lambda **kw: agg.NashMTL(n_tasks=K, **kw),
    {"max_norm": 1.0, "update_weights_every": 1},
    "steps",
  ),
}


def _on_gramian(weighting):
  """An aggregator J -> weighting(J Jᵀ) @ J."""
  return lambda matrix: weighting(matrix @ matrix.T) @ matrix


def _run(aggregator, matrix: np.ndarray) -> list[float]:
  out = aggregator(torch.tensor(matrix, dtype=torch.float64))
  return _short(out.detach().numpy()).tolist()


def main() -> None:
  torch.manual_seed(0)
  cases = _cases()
  sequences = _sequences()
  golden = {
    "torchjd": metadata.version("torchjd"),
    "torch": torch.__version__,
    "cases": {name: m.tolist() for name, m in cases.items()},
    "sequences": {name: s.tolist() for name, s in sequences.items()},
    "aggregators": {},
    "stateful": {},
  }
  for name, (make, kwargs) in AGGREGATORS.items():
    golden["aggregators"][name] = {
      "kwargs": kwargs,
      "outputs": {case: _run(make(), m) for case, m in cases.items()},
    }
  for name, (make, kwargs, sequence) in STATEFUL.items():
    instance = make(**kwargs)
    golden["stateful"][name] = {
      "kwargs": kwargs,
      "sequence": sequence,
      "outputs": [_run(instance, m) for m in sequences[sequence]],
    }
  with open(OUT, "w") as f:
    json.dump(golden, f, indent=None, separators=(",", ":"))
    f.write("\n")
  print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
  main()
