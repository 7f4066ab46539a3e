"""``--engine``: a Gramian in place of the stacked per-exit gradients.

A run with ``--engine gramian`` must train as ``--engine stacked`` does (the
aggregator gives the same update from either), record its engine in
``config.json`` and resume with it; an optimizer that reads every
coordinate of the per-exit gradients is refused with one line, and
``auto`` gives it stacked gradients.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_anytime import tiny_net

import osgd_jax
from osgd_jax import aggregation
from osgd_jax.app import train as train_lib
from osgd_jax.app.train import cli
from osgd_jax.app.train import step as step_lib

SMALL = train_lib.TrainConfig(
  model="nested-depth-mlp",
  epochs=1,
  batch_size=256,
  optimizer="upgrad",
  lr=0.1,
  progress=False,
)


def test_a_gramian_run_trains_as_a_stacked_run_and_resumes(tmp_path):
  runs = {}
  for engine in ("stacked", "gramian"):
    config = dataclasses.replace(
      SMALL, engine=engine, out=str(tmp_path / engine)
    )
    runs[engine] = train_lib.train(config)
  stacked, gramian = runs["stacked"], runs["gramian"]
  np.testing.assert_allclose(
    gramian.history[0]["train_loss"],
    stacked.history[0]["train_loss"],
    rtol=1e-4,
  )
  np.testing.assert_allclose(
    gramian.test_accuracy, stacked.test_accuracy, atol=0.01
  )
  saved = json.loads((tmp_path / "gramian" / train_lib.CONFIG_FILE).read_text())
  assert saved["engine"] == "gramian"
  # Another engine is a changed setting, refused as any other is ...
  config = dataclasses.replace(
    SMALL, engine="stacked", out=str(tmp_path / "gramian"), resume=True
  )
  with pytest.raises(
    ValueError,
    match=r"--engine was 'gramian', now 'stacked'.*"
    r"resume with its settings \(--engine gramian\)",
  ):
    train_lib.train(config)
  # ... and the run resumes with its own.
  resumed = train_lib.train(dataclasses.replace(config, engine="gramian"))
  np.testing.assert_array_equal(resumed.test_accuracy, gramian.test_accuracy)
  # Checkpoints from before the field existed resume with the default.
  del saved["engine"]
  train_lib.check_resumable(saved, dataclasses.replace(SMALL, resume=True))


def test_the_step_hands_the_aggregator_a_gramian_only_where_asked():
  model, x, y = tiny_net("branched-mlp")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  weights = jnp.ones(3)
  for engine, per_exit_grads, want in [
    ("gramian", "staged", "staged"),
    ("auto", "vmap", "auto"),
    ("stacked", "staged", None),
  ]:
    config = dataclasses.replace(
      SMALL, engine=engine, per_exit_grads=per_exit_grads
    )
    _, grads = jax.eval_shape(
      step_lib._grad_fn(config, graphdef, weights), params, rest, x, y
    )
    if want is None:
      assert jax.tree.structure(grads) == jax.tree.structure(params)
    else:
      assert isinstance(grads, osgd_jax.Gramian)
      forms = (
        ("staged", "staged-keep")
        if want == "staged"
        else ("vmap", "scan", "blocks")
      )
      assert grads.form in forms


def test_coordinate_optimizers_are_those_that_refuse_a_gramian():
  # The list the app keeps is checked against the library's own refusals.
  params = {"a": jnp.ones(3), "b": jnp.ones((2,))}

  def loss_fn(p):
    return jnp.stack([p["a"].sum(), (p["a"] ** 2).sum(), p["b"].sum()])

  losses, gramian = osgd_jax.value_and_gramian(loss_fn)(params)
  refused = []
  for name in aggregation.names():
    config = dataclasses.replace(SMALL, optimizer=name)
    tx = train_lib.aggregator_for(config, total_steps=10, num_exits=3)
    assert tx is not None
    try:  # traced only: the refusal comes at trace time
      jax.eval_shape(
        lambda g, s, p, tx=tx: tx.update(g, s, p, losses=losses),
        gramian,
        tx.init(params),
        params,
      )
    except ValueError as e:
      assert "osgd_jax.Gramian does not hold" in str(e), (name, e)
      refused.append(name)
  assert tuple(sorted(refused)) == train_lib.COORDINATE_OPTIMIZERS


@pytest.mark.parametrize(
  "args, fragment",
  [
    *(
      (
        ["--optimizer", name],
        f"--optimizer {name} reads every coordinate of the per-exit"
        " gradients, which --engine gramian does not form; use --engine"
        " stacked",
      )
      for name in train_lib.COORDINATE_OPTIMIZERS
    ),
    (
      ["--method", "sequential"],
      "--method sequential runs Gram-Schmidt on the gradients themselves",
    ),
    (["--optimizer", "sgd"], "--optimizer sgd differentiates the summed loss"),
  ],
)
def test_engine_gramian_refuses_with_one_line(args, fragment, capsys):
  status = cli.main([*args, "--engine", "gramian"])
  lines = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(lines) == 1 and fragment in lines[0], lines
  # auto gives them stacked gradients (or, for sgd, the summed gradient).
  config = cli.config_from_args(args)
  assert config.engine == "auto" and not config.uses_gramian
  # The advice, followed: --engine stacked is accepted.
  if "--engine stacked" in fragment:
    cli.config_from_args([*args, "--engine", "stacked"])


def test_engine_flag_reaches_the_config():
  assert cli.config_from_args([]).engine == "auto"
  assert cli.config_from_args([]).uses_gramian
  for engine in train_lib.ENGINES:
    assert cli.config_from_args(["--engine", engine]).engine == engine
  with pytest.raises(ValueError, match="unknown --engine 'fast'"):
    dataclasses.replace(SMALL, engine="fast").validate()
