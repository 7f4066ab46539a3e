"""The step-size ratio behind the matched control ``sgd-matched``.

OSGD sums projected components, each no longer than its exit's gradient.
Once the exits' gradients agree, the projection removes what they share and
OSGD's update is shorter than the summed gradient plain SGD follows (it can
be longer where they conflict), so at one learning rate the two take steps
of different sizes. ``sgd-matched`` runs plain summed-loss SGD at OSGD's
tuned learning rate times the ratio of the two norms, measured along OSGD's
tuned run, to tell the projection's effect on the direction of the steps
from its effect on their size. At initialisation the exits' gradients are
nearly orthogonal and the ratio is close to 1; it falls as training goes
on, so it is measured over the whole run, not at the start.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from osgd_jax.aggregation import OsgdState
from osgd_jax.app.train import TrainConfig, start_run, train_epoch

__all__ = ["measure_update_ratio", "update_and_sum_norms"]


@jax.jit
def update_and_sum_norms(state: OsgdState) -> jax.Array:
  """``[‖u‖, ‖Σ_k g_k‖]`` of OSGD's last step, from its state's diagnostics.

  ``u = Σ_k ĝ_k`` is OSGD's aggregate (without ``rescale``): its components
  are orthogonal within each group, so ``‖u‖² = Σ_groups Σ_k ‖ĝ_k‖²``
  (``projected_sq_norms``). The summed gradient's
  ``‖Σ_k g_k‖² = Σ_jk cos_jk ‖g_j‖ ‖g_k‖`` (``cosine``, ``exit_norms``, all
  over the whole parameter vector).

  Args:
    state: the :class:`~osgd_jax.aggregation.OsgdState` after an update.

  Returns:
    A float32 array ``(2,)``.

  Example:
    >>> import osgd_jax
    >>> tx = osgd_jax.osgd(num_exits=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> _, state = tx.update({"w": jnp.array([[3.0, 0.0], [3.0, 4.0]])},
    ...                      tx.init(params), params)
    >>> [round(float(v), 3) for v in update_and_sum_norms(state)]  # u = (3, 4)
    [5.0, 7.211]
  """
  norms, cosine = state.exit_norms, state.cosine
  summed_sq = jnp.maximum(norms @ cosine @ norms, 0.0)
  return jnp.stack(
    [jnp.sqrt(jnp.sum(state.projected_sq_norms)), jnp.sqrt(summed_sq)]
  )


def measure_update_ratio(config: TrainConfig) -> dict[str, Any]:
  """Trains OSGD's run again and measures its mean update norm against SGD's.

  Definition: the run of ``config`` (OSGD, in the comparison its tuning run
  at the chosen learning rate) is trained again from the start, exactly as
  it was (same seed, data and order), without evaluation or checkpoints. At
  every step t, ``u_t`` is OSGD's aggregate of the exit gradients
  ``g_{t,k}`` and ``s_t = Σ_k g_{t,k}`` the gradient of the summed loss
  that plain SGD would follow at the same point; norms are over all
  parameters. The ratio is

      r = Σ_t ‖u_t‖ / Σ_t ‖s_t‖,

  OSGD's mean update norm over the run divided by the mean norm of the
  summed gradient along the same path. SGD at ``lr × r`` thus steps as far
  per step, on average, as OSGD at ``lr`` did, before the weight decay and
  momentum both share. On CPU it is the same on every call, bit for bit.

  Args:
    config: an OSGD run without ``rescale`` or ``switch_to_sgd`` (whose
      updates the diagnostics do not describe); ``config.out`` is a
      directory for the run's ``config.json``.

  Returns:
    ``{"ratio", "epoch_ratios", "first_step_ratio", "steps"}``:
    ``epoch_ratios`` is the same ratio over each epoch's steps, to show
    how it drifts as the exits' gradients come to agree.

  Raises:
    ValueError: ``config`` is not such an OSGD run, or a bad setting.
    TrainingDiverged: a loss became NaN or Inf.

  Example:
    >>> measured = measure_update_ratio(TrainConfig(
    ...     model="branched-mlp", epochs=1, out="/tmp/m"))  # doctest: +SKIP
    >>> 0 < measured["ratio"] <= 1  # doctest: +SKIP
    True
  """
  if (
    config.optimizer != "osgd"
    or config.rescale
    or config.switch_to_sgd is not None
  ):
    raise ValueError(
      "measure_update_ratio measures plain OSGD's updates;"
      " give it an osgd run without --rescale or"
      " --switch-to-sgd."
    )
  run, state = start_run(config)
  step, measured = run.step, []

  def measuring_step(*args):
    *new_state, losses = step(*args)
    measured.append(update_and_sum_norms(new_state[2][0]))  # on the device
    return (*new_state, losses)

  run.step = measuring_step
  try:
    for epoch in range(config.epochs):
      state, _, _ = train_epoch(run, state, epoch)
  finally:
    run.store.close()
  norms = np.asarray(jax.device_get(measured), np.float64)
  per_epoch = norms.reshape(config.epochs, -1, 2).sum(axis=1)
  return {
    "ratio": float(norms[:, 0].sum() / norms[:, 1].sum()),
    "epoch_ratios": (per_epoch[:, 0] / per_epoch[:, 1]).tolist(),
    "first_step_ratio": float(norms[0, 0] / norms[0, 1]),
    "steps": len(norms),
  }
