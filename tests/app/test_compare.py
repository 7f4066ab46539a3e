"""``osgd-compare``: a tiny real comparison round-trips run → results.json →
report → Markdown; the statistics match an independent computation; the
tables format a hand-written results file; diverged, interrupted and
refused runs are what docs/faults.md says."""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from closed_pipe import ReaderGoneAfter

import osgd_jax
from osgd_jax.app import compare
from osgd_jax.app import report as report_lib
from osgd_jax.app.compare import (
  experiment,
  matched,
  results,
  runs,
  stats,
  tables,
  variants,
)
from osgd_jax.app.compare import report as compare_report
from osgd_jax.app.train import (
  OPTIMIZERS,
  TrainConfig,
  TrainingDiverged,
  TrainResult,
)
from osgd_jax.zoo import registry

# digits' 1438 training examples make 5 batches of 256, and so do the 1294
# left by --validation 0.1: the tuning and the test runs of a rate share one
# compiled step.
TINY = [
  "--models",
  "branched-mlp",
  "--epochs",
  "1",
  "--batch-size",
  "256",
  "--lr-grid",
  "0.05,0.1",
  "--validation",
  "0.1",
  "--seeds",
  "2",
]


def _json(path):
  return json.loads(path.read_text())


@pytest.fixture
def two_exit_mlp(monkeypatch):
  # The digits preset's branched-mlp with 2 stages instead of 4: each of
  # the comparison's 11 runs compiles about half as much, and 2 exits are
  # enough for OSGD to project and for every table and figure to draw.
  preset = dict(registry._PRESETS["branched-mlp"]["digits"], stages=2)
  monkeypatch.setitem(registry._PRESETS["branched-mlp"], "digits", preset)


@pytest.mark.slow
def test_a_tiny_comparison_round_trips_through_results_json(
  tmp_path, capsys, two_exit_mlp
):
  out = tmp_path / "cmp"
  args = [
    *TINY,
    "--optimizers",
    "sgd",
    "osgd",
    "sgd-matched",
    "--out",
    str(out),
  ]
  assert compare.main(args) == 0
  printed = capsys.readouterr().out
  assert "[11/11] branched-mlp, sgd-matched" in printed
  payload = _json(out / "results.json")
  assert payload["format"] == results.FORMAT
  settings = payload["settings"]
  assert (settings["lr_grid"], settings["seeds"], settings["validation"]) == (
    [0.05, 0.1],
    [0, 1],
    0.1,
  )
  entry = payload["models"]["branched-mlp"]
  assert len(entry["flops"]) == len(entry["params"]) == 2
  assert list(entry["optimizers"]) == ["sgd", "osgd", "sgd-matched"]
  for name in ("sgd", "osgd"):
    result = entry["optimizers"][name]
    assert [p["lr"] for p in result["grid"]] == [0.05, 0.1]
    assert result["chosen_lr"] == experiment.choose_rate(result["grid"])
  # sgd-matched: osgd's chosen rate times the ratio measured along osgd's
  # tuning run at that rate.
  ratio = entry["matched"]
  assert ratio["osgd_lr"] == entry["optimizers"]["osgd"]["chosen_lr"]
  assert entry["optimizers"]["sgd-matched"]["chosen_lr"] == (
    ratio["osgd_lr"] * ratio["ratio"]
  )
  assert ratio["steps"] == 5 and 0 < ratio["ratio"] < 2
  assert np.asarray(
    entry["optimizers"]["sgd-matched"]["test_accuracy"]
  ).shape == (2, 2)
  # A tuning run is scored on the validation split, and says so; a test run
  # on the test set.
  osgd = out / "branched-mlp" / "osgd"
  tuned = _json(osgd / "tune" / "lr0.05" / "metrics.json")["final"]
  assert tuned["evaluated_on"] == "validation" and "test_accuracy" not in tuned
  assert (
    tuned["val_accuracy"]
    == entry["optimizers"]["osgd"]["grid"][0]["val_accuracy"]
  )
  chosen = entry["optimizers"]["osgd"]["chosen_lr"]
  assert (
    _json(osgd / "test" / f"lr{chosen!r}" / "seed1" / "metrics.json")["final"][
      "evaluated_on"
    ]
    == "test"
  )
  # The report is made from the JSON alone.
  report = (out / "report.md").read_text()
  assert report.startswith(compare.render_markdown(payload))
  assert all(
    (out / f"{kind}-branched-mlp.png").stat().st_size > 0
    for kind in ("accuracy", "flops", "lr")
  )
  # The same command again trains nothing and reports the same.
  assert compare.main(args) == 0
  again = capsys.readouterr().out
  assert again.count(": skipped in") == 10 and ": trained" not in again
  assert ": skipped, ratio" in again
  assert (out / "report.md").read_text() == report
  # --report from the JSON fills the README section with the same tables.
  readme = tmp_path / "README.md"
  readme.write_text(
    "# title\n<!-- compare:digits:begin -->\nold\n"
    "<!-- compare:digits:end -->\nafter\n"
  )
  assert (
    compare.main(
      [
        "--report",
        str(out / "results.json"),
        "--report-out",
        str(tmp_path / "rep"),
        "--readme",
        str(readme),
        "--section",
        "digits",
      ]
    )
    == 0
  )
  assert readme.read_text() == (
    "# title\n<!-- compare:digits:begin -->\n"
    + compare.render_markdown(payload)
    + "<!-- compare:digits:end -->\nafter\n"
  )
  assert (tmp_path / "rep" / "report.md").read_text() == report


# Hand-written results: two models (2 and 3 exits), three seeds.
HAND = {
  "format": results.FORMAT,
  "version": results.VERSION,
  "settings": {
    "base_config": {
      "schedule": "cosine",
      "momentum": 0.9,
      "weight_decay": 0.0005,
    },
    "dataset": "digits",
    "epochs": 15,
    "batch_size": 64,
    "models": ["branched-mlp", "nested-depth-mlp"],
    "optimizers": ["sgd", "osgd", "pcgrad"],
    "variants": {},
    "lr_grid": [0.01, 0.1],
    "validation": 0.2,
    "validation_split_seed": 0,
    "tuning_seed": 1000,
    "seeds": [0, 1, 2],
    "selection": "",
    "baseline": "sgd",
    "matched_to": "osgd",
    "confidence": 0.95,
  },
  "models": {
    "branched-mlp": {
      "flops": [10.0, 20.0],
      "flops_source": "xla",
      "params": [1, 2],
      "matched": None,
      "optimizers": {
        "sgd": {
          "grid": [
            {"lr": 0.01, "val_accuracy": [0.5, 0.6]},
            {"lr": 0.1, "val_accuracy": [0.6, 0.7]},
          ],
          "chosen_lr": 0.1,
          "test_accuracy": [[0.5, 0.7], [0.6, 0.8], [0.7, 0.9]],
        },
        "osgd": {
          "grid": [
            {"lr": 0.01, "val_accuracy": [0.6, 0.8]},
            {"lr": 0.1, "val_accuracy": None},
          ],
          "chosen_lr": 0.01,
          "test_accuracy": [[0.55, 0.75], [0.66, 0.86], [0.77, 0.97]],
        },
        "pcgrad": {
          "grid": [
            {"lr": 0.01, "val_accuracy": [0.5, 0.5]},
            {"lr": 0.1, "val_accuracy": [0.55, 0.65]},
          ],
          "chosen_lr": 0.1,
          "test_accuracy": [[0.6, 0.6], None, [0.6, 0.9]],
        },
      },
    },
    "nested-depth-mlp": {
      "flops": [10.0, 20.0, 30.0],
      "flops_source": "xla",
      "params": [1, 2, 3],
      "matched": None,
      "optimizers": {
        "sgd": {
          "grid": [
            {"lr": 0.01, "val_accuracy": [0.2, 0.4, 0.6]},
            {"lr": 0.1, "val_accuracy": [0.3, 0.6, 0.9]},
          ],
          "chosen_lr": 0.1,
          "test_accuracy": [[0.3, 0.6, 0.9]] * 3,
        },
        "osgd": {
          "grid": [
            {"lr": 0.01, "val_accuracy": None},
            {"lr": 0.1, "val_accuracy": None},
          ],
          "chosen_lr": None,
          "test_accuracy": None,
        },
      },
    },
  },
}


def test_the_tables_of_a_hand_written_results_file():
  assert tables.accuracy_table(HAND).splitlines() == [
    "| model | optimizer | lr | exit 1 | exit 2 | exit 3 | mean |",
    "| --- | --- | --- | --- | --- | --- | --- |",
    "| branched-mlp | sgd | 0.1 | 60.0 ± 10.0 | 80.0 ± 10.0 | — |"
    " 70.0 ± 10.0 |",
    "| branched-mlp | osgd | 0.01 | 66.0 ± 11.0 | 86.0 ± 11.0 | — |"
    " 76.0 ± 11.0 |",
    "| branched-mlp | pcgrad (1/3 diverged) | 0.1 | 60.0 ± 0.0 | 75.0 ± 21.2"
    " | — | 67.5 ± 10.6 |",
    "| nested-depth-mlp | sgd | 0.1 | 30.0 ± 0.0 | 60.0 ± 0.0 | 90.0 ± 0.0 |"
    " 60.0 ± 0.0 |",
    "| nested-depth-mlp | osgd | — | every grid rate diverged | — | — | — |",
  ]
  # t(0.975, 2) = 4.303 for osgd's 3 pairs, t(0.975, 1) = 12.706 for
  # pcgrad's 2 (seed 1 diverged); bold: the interval excludes 0.
  assert tables.difference_table(HAND).splitlines()[2:] == [
    "| branched-mlp | osgd | 3 | **+6.0 ± 2.5** | **+6.0 ± 2.5** | — |"
    " **+6.0 ± 2.5** |",
    "| branched-mlp | pcgrad | 2 | +0.0 ± 127.1 | -5.0 ± 63.5 | — |"
    " -2.5 ± 31.8 |",
    "| nested-depth-mlp | osgd | 0 | — | — | — | — |",
  ]
  assert tables.robustness_table(HAND).splitlines() == [
    "| model | lr | sgd | osgd | pcgrad |",
    "| --- | --- | --- | --- | --- |",
    "| branched-mlp | 0.01 | 55.0 / 60.0 | 70.0 / 80.0 * | 50.0 / 50.0 |",
    "| branched-mlp | 0.1 | 65.0 / 70.0 * | diverged | 60.0 / 65.0 * |",
    "| nested-depth-mlp | 0.01 | 40.0 / 60.0 | diverged | — |",
    "| nested-depth-mlp | 0.1 | 60.0 / 90.0 * | diverged | — |",
  ]
  assert tables.matched_table(HAND) == ""
  markdown = tables.render_markdown(HAND)
  assert "over 3 seeds" in markdown and "seeds 0–2" in markdown
  assert "sgd-matched" not in markdown  # not run, so not described
  assert (
    "branched-mlp: sgd 0.1, osgd 0.01, pcgrad 0.1; nested-depth-mlp: sgd 0.1."
  ) in markdown
  without_baseline = json.loads(json.dumps(HAND))
  without_baseline["settings"]["baseline"] = "sgd-mean"
  assert tables.difference_table(without_baseline) == (
    "(No `sgd-mean` runs to pair the others with.)"
  )


def test_the_differences_figure_draws_each_pair_and_its_interval(tmp_path):
  written = compare_report.write_report(HAND, str(tmp_path))
  path = tmp_path / compare_report.DIFFERENCES_FIGURE
  assert written[:2] == [str(tmp_path / "report.md"), str(path)]
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Drawn from the same pairs as the table above: osgd's mean over exits,
  # +6.0 ± 4.303 * 0.01 / sqrt(3) points, excludes 0 (a filled marker);
  # pcgrad's -2.5 ± 31.8 does not; nested-depth-mlp's osgd never ran.
  fig = report_lib.plot_paired_differences(
    {
      model: {
        name: (overall.mean, overall.half_width)
        for name, (_, overall) in rows.items()
      }
      for model, rows in tables.paired_differences(HAND).items()
    },
    str(tmp_path / "again.png"),
  )
  branched, nested = fig.axes
  assert [t.get_text() for t in branched.get_yticklabels()] == [
    "osgd",
    "pcgrad",
  ]
  markers = [line for line in branched.lines if line.get_marker() == "o"]
  assert [
    (float(m.get_xdata()[0]), float(m.get_ydata()[0])) for m in markers
  ] == [(pytest.approx(6.0), 0.0), (pytest.approx(-2.5), 1.0)]
  assert [m.get_markerfacecolor() != "white" for m in markers] == [True, False]
  bars = [c.get_segments()[0] for c in branched.collections]
  half = 100 * 4.302652729911275 * 0.01 / math.sqrt(3)
  np.testing.assert_allclose(bars[0][:, 0], [6.0 - half, 6.0 + half])
  assert not [line for line in nested.lines if line.get_marker() == "o"]
  # With nothing to pair, no figure.
  without_baseline = json.loads(json.dumps(HAND))
  del without_baseline["models"]["branched-mlp"]["optimizers"]["sgd"]
  del without_baseline["models"]["nested-depth-mlp"]["optimizers"]["sgd"]
  assert compare_report.DIFFERENCES_FIGURE not in [
    os.path.basename(p)
    for p in compare_report.write_report(
      without_baseline, str(tmp_path / "none")
    )
  ]


def test_paired_differences_match_an_independent_float64_computation():
  # Accuracies of 5 seeds, two diverged runs among the 6 pairs.
  a = np.array([0.912, 0.934, 0.921, np.nan, 0.945, 0.928])
  b = np.array([0.905, 0.921, 0.926, 0.930, 0.931, np.nan])
  d = stats.paired_difference(a, b)
  kept = np.array([0.007, 0.013, -0.005, 0.014])
  mean = kept.sum() / 4
  sd = math.sqrt(((kept - mean) ** 2).sum() / 3)
  assert d.n == 4
  assert d.mean == pytest.approx(mean, abs=1e-15)
  assert d.half_width == pytest.approx(3.182446305284263 * sd / 2, rel=1e-12)
  assert d.excludes_zero == (abs(mean) > 3.182446305284263 * sd / 2)
  # 4 degrees of freedom: t = 2.776.
  five = stats.paired_difference(
    np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.zeros(5)
  )
  assert (five.n, five.mean) == (5, 3.0)
  assert five.half_width == pytest.approx(
    2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5), rel=1e-12
  )
  assert five.excludes_zero
  assert not stats.paired_difference(
    np.array([1.0, -1.0]), np.zeros(2)
  ).excludes_zero
  one = stats.paired_difference(np.array([0.5, np.nan]), np.array([0.4, 0.3]))
  assert one.n == 1 and math.isnan(one.half_width) and not one.excludes_zero
  assert stats.paired_difference(np.array([np.nan]), np.array([0.1])).n == 0
  # The printed tables' values.
  for p, dof, t in (
    (0.975, 1, 12.706),
    (0.975, 4, 2.776),
    (0.975, 9, 2.262),
    (0.995, 4, 4.604),
    (0.975, 1000, 1.962),
  ):
    assert stats.t_quantile(p, dof) == pytest.approx(t, abs=5e-4)


def test_the_chosen_rate_is_the_best_mean_then_the_smaller_and_never_diverged():
  grid = [
    {"lr": 0.01, "val_accuracy": [0.5, 0.9]},
    {"lr": 0.05, "val_accuracy": [0.8, 0.6]},  # the same mean: a tie
    {"lr": 0.1, "val_accuracy": None},
  ]
  assert experiment.choose_rate(grid) == 0.01
  assert experiment.choose_rate(grid[1:]) == 0.05
  assert experiment.choose_rate(grid[2:]) is None


def test_each_optimizer_name_sets_its_fields():
  base = TrainConfig(model="branched-mlp")
  for name in variants.VARIANTS:
    variants.config_for(base, name).validate()
  global_ = variants.config_for(base, "osgd-global", lr=0.2)
  assert (global_.optimizer, global_.granularity, global_.lr) == (
    "osgd",
    "global",
    0.2,
  )
  assert variants.config_for(base, "osgd-rescale").rescale
  assert variants.config_for(base, "osgd-switch").switch_to_sgd == 0.8
  assert variants.config_for(base, "sgd-matched").optimizer == "sgd"
  assert set(OPTIMIZERS) <= set(variants.VARIANTS)


def test_the_update_norms_from_osgd_s_state_are_the_direct_norms():
  keys = jax.random.split(jax.random.key(0), 2)
  grads = {
    "a": jax.random.normal(keys[0], (3, 4, 5)),
    "b": jax.random.normal(keys[1], (3, 7)) + 1.0,
  }  # correlated rows
  params = jax.tree.map(lambda g: g[0], grads)
  tx = osgd_jax.osgd(num_exits=3)

  @jax.jit
  def norms(grads):
    update, state = tx.update(grads, tx.init(params), params)
    summed = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)
    return (
      matched.update_and_sum_norms(state),
      optax.tree.norm(update),
      optax.tree.norm(summed),
    )

  (u, s), update, summed = norms(grads)
  assert float(u) == pytest.approx(float(update), rel=1e-5)
  assert float(s) == pytest.approx(float(summed), rel=1e-5)


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["--lr-grid", ""],
      "--lr-grid '' is not a list of numbers; give finite"
      " rates > 0 separated by commas, such as 0.01,0.05,0.1.",
    ),
    (
      ["--lr-grid", "0.1,-1"],
      "--lr-grid '0.1,-1' has -1.0, not a finite rate > 0",
    ),
    (["--lr-grid", "0.1,nan"], "has nan, not a finite rate > 0"),
    (["--lr-grid", "0,0.1"], "has 0.0, not a finite rate > 0"),
    (["--lr-grid", "0.1,0.1"], "names a rate twice"),
    (
      ["--optimizers", "sgd", "osgd-fast"],
      "unknown optimizer 'osgd-fast' in --optimizers; choose from: osgd, sgd,",
    ),
    (
      ["--optimizers", "sgd", "sgd-matched"],
      "sgd-matched takes its learning"
      " rate from osgd's tuned rate; add osgd to --optimizers.",
    ),
    (["--optimizers", "sgd", "sgd"], "--optimizers names sgd more than once"),
    (["--seeds", "0"], "--seeds must be an integer from 1 to 1000, got 0."),
    (["--validation", "0"], "--validation must be a finite number in (0, 1)"),
    (["--validation", "nan"], "--validation must be a finite number in (0, 1)"),
    (["--epochs", "0"], "--epochs must be an integer from 1"),
    (["--readme", "README.md"], "--readme and --section go together"),
    (["--report-out", "x"], "go with --report RESULTS"),
  ],
)
def test_bad_input_is_one_line_and_status_2(args, message, tmp_path, capsys):
  assert compare.main([*args, "--out", str(tmp_path / "cmp")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err
  assert not (tmp_path / "cmp").exists()  # refused before any work


def test_a_report_of_a_missing_or_foreign_file_is_one_line(tmp_path, capsys):
  foreign = tmp_path / "metrics.json"
  foreign.write_text(json.dumps({"config": {}, "epochs": []}))
  broken = tmp_path / "broken.json"
  broken.write_text("{")
  good = tmp_path / "results.json"
  good.write_text(json.dumps(HAND))
  readme = tmp_path / "README.md"
  readme.write_text("no markers\n")
  for args, message in [
    (
      ["--report", str(tmp_path / "none.json")],
      "does not exist; pass the"
      " results.json that osgd-compare wrote in its --out.",
    ),
    (["--report", str(foreign)], "is not an osgd-compare results file"),
    (["--report", str(broken)], "cannot be read as JSON"),
    (
      ["--report", str(good), "--seeds", "3"],
      "--report makes the report"
      " from a results file and trains nothing; leave out --seeds.",
    ),
    (
      ["--report", str(good), "--readme", str(readme), "--section", "digits"],
      "needs the line <!-- compare:digits:begin --> and, below it, the line"
      " <!-- compare:digits:end -->, once each",
    ),
    (
      ["--report", str(good), "--readme", str(readme), "--section", "a b"],
      "--section 'a b' must be letters",
    ),
  ]:
    assert compare.main(args) == 2, args
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
  assert readme.read_text() == "no markers\n"  # a refused report writes nothing
  assert compare.main(["--report", str(good)]) == 0
  assert (
    (tmp_path / "report.md")
    .read_text()
    .startswith(tables.render_markdown(HAND))
  )


class _FakeTraining:
  """Stands in for training: accuracy from (lr, seed), faults on request."""

  def __init__(self, faults=None):
    self.faults = dict(faults or {})  # (optimizer, lr, seed) -> exception
    self.calls = []

  def __call__(self, config):
    self.calls.append((config.optimizer, config.lr, config.seed))
    os.makedirs(config.out, exist_ok=True)
    fault = self.faults.pop((config.optimizer, config.lr, config.seed), None)
    if fault is not None:
      raise fault
    accuracy = np.array([0.5, 0.6]) + config.lr + config.seed % 10 / 100
    on_test = config.evaluated_on == "test"
    return TrainResult(
      [],
      accuracy if on_test else None,
      None,
      None,
      None,
      config.out,
      None,
      None if on_test else accuracy,
      None,
      config.evaluated_on,
    )


def _no_model(monkeypatch, fake):
  monkeypatch.setattr(runs, "train", fake)
  monkeypatch.setattr(
    experiment,
    "model_costs",
    lambda config: {
      "flops": [1.0, 2.0],
      "flops_source": "xla",
      "params": [1, 2],
    },
  )
  monkeypatch.setattr(
    matched,
    "measure_update_ratio",
    lambda config: {
      "ratio": 0.5,
      "epoch_ratios": [0.5],
      "first_step_ratio": 1.0,
      "steps": 5,
    },
  )


def test_diverged_and_interrupted_runs(tmp_path, capsys, monkeypatch):
  out = tmp_path / "cmp"
  args = [
    *TINY,
    "--optimizers",
    "sgd",
    "osgd",
    "sgd-matched",
    "--out",
    str(out),
  ]
  fake = _FakeTraining(
    {
      ("osgd", 0.1, experiment.TUNING_SEED): TrainingDiverged("non-finite"),
      ("sgd", 0.1, 1): KeyboardInterrupt(),
    }
  )
  _no_model(monkeypatch, fake)
  assert compare.main(args) == 130
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "Run the same command again to continue" in err[0]
  assert (
    _json(
      out
      / "branched-mlp"
      / "sgd"
      / "test"
      / "lr0.1"
      / "seed0"
      / compare.RESULT_FILE
    )["status"]
    == "finished"
  )
  fake.faults[("sgd", 0.1, 1)] = TrainingDiverged("non-finite loss")
  done = len(fake.calls)
  assert compare.main(args) == 0
  printed = capsys.readouterr().out
  # Only the interrupted run is trained again, and now it diverges.
  assert fake.calls[done:] == [
    ("sgd", 0.1, 1),
    ("osgd", 0.05, 0),
    ("osgd", 0.05, 1),
    ("sgd", 0.025, 0),
    ("sgd", 0.025, 1),
  ]
  assert "tuning lr 0.1: diverged" in printed and "seed 1: diverged" in printed
  entry = _json(out / "results.json")["models"]["branched-mlp"]["optimizers"]
  # A diverged tuning run fails its rate; the other rate is chosen.
  assert entry["osgd"]["grid"][1] == {
    "lr": 0.1,
    "status": "diverged",
    "val_accuracy": None,
  }
  assert entry["osgd"]["chosen_lr"] == 0.05
  assert entry["sgd-matched"]["chosen_lr"] == 0.025
  assert entry["sgd"]["test_accuracy"][1] is None
  assert (
    "| branched-mlp | sgd (1/2 diverged) | 0.1 |"
    in (out / "report.md").read_text()
  )
  # Recorded: a third call trains nothing.
  done = len(fake.calls)
  assert compare.main(args) == 0
  assert fake.calls[done:] == []


def test_every_rate_diverged_leaves_the_optimizer_untested(
  tmp_path, capsys, monkeypatch
):
  fake = _FakeTraining(
    {
      ("osgd", lr, experiment.TUNING_SEED): TrainingDiverged("non-finite")
      for lr in (0.05, 0.1)
    }
  )
  _no_model(monkeypatch, fake)
  assert (
    compare.main(
      [
        *TINY,
        "--optimizers",
        "sgd",
        "osgd",
        "sgd-matched",
        "--out",
        str(tmp_path),
      ]
    )
    == 0
  )
  printed = capsys.readouterr().out
  assert "branched-mlp, osgd: no learning rate to test" in printed
  entry = _json(tmp_path / "results.json")["models"]["branched-mlp"]
  assert entry["optimizers"]["osgd"]["test_accuracy"] is None
  assert entry["optimizers"]["sgd-matched"]["chosen_lr"] is None
  assert "| branched-mlp | osgd | — | every grid rate diverged |" in printed
  assert "| branched-mlp | sgd-matched | — | no rate to match |" in printed
  assert (
    "branched-mlp, sgd-matched: no learning rate to test (osgd has no"
    " rate, or its measured run diverged)"
  ) in printed


def test_a_directory_of_other_settings_is_refused(tmp_path, capsys):
  out = tmp_path / "cmp"
  run = out / "branched-mlp" / "sgd" / "tune" / "lr0.05"
  run.mkdir(parents=True)
  config = TrainConfig(
    model="branched-mlp",
    optimizer="sgd",
    epochs=3,
    lr=0.05,
    seed=experiment.TUNING_SEED,
    validation=0.1,
    out=str(run),
  )
  (run / compare.RESULT_FILE).write_text(
    json.dumps(
      {
        "status": "finished",
        "config": config.to_json(),
        "val_accuracy": [0.5] * 4,
      }
    )
  )
  assert compare.main([*TINY, "--optimizers", "sgd", "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert "holds a finished run with other settings" in err
  assert "--batch-size was 64, now 256; --epochs was 3, now 1)" in err
  assert "its settings or a new --out" in err


def test_a_wider_grid_trains_only_the_new_runs(tmp_path, capsys, monkeypatch):
  fake = _FakeTraining()
  _no_model(monkeypatch, fake)
  args = [*TINY, "--optimizers", "sgd", "--out", str(tmp_path)]
  assert compare.main(args) == 0
  done = len(fake.calls)
  wider = [*args, "--lr-grid", "0.05,0.1,0.2"]  # the last --lr-grid counts
  assert compare.main(wider) == 0
  # The new rate's tuning run, and the test runs of the new choice (the
  # fake's accuracy grows with the rate).
  assert fake.calls[done:] == [
    ("sgd", 0.2, experiment.TUNING_SEED),
    ("sgd", 0.2, 0),
    ("sgd", 0.2, 1),
  ]
  capsys.readouterr()


def test_mnist1d_is_checked_against_each_model(tmp_path, capsys, monkeypatch):
  # A ResNet is refused before any run.
  argv = ["--dataset", "mnist1d", "--models", "nested-depth-mlp"]
  argv += ["branched-resnet", "--out", str(tmp_path)]
  assert compare.main(argv) == 2
  assert (
    "--model branched-resnet cannot read --dataset mnist1d's inputs"
    in capsys.readouterr().err
  )
  # MLPs pass every run's check, although the shared settings' own model is
  # a ResNet; the plan reaches the experiment.
  planned = []

  def stop(plan):
    planned.append(plan)
    raise ValueError("planned")

  monkeypatch.setattr(experiment, "run_comparison", stop)
  assert (
    compare.main(
      [
        "--dataset",
        "MNIST-1D",
        "--models",
        "branched-mlp",
        "nested-depth-mlp",
        "--out",
        str(tmp_path / "mlp"),
      ]
    )
    == 2
  )
  assert "planned" in capsys.readouterr().err
  assert [(p.base.dataset, p.models) for p in planned] == [
    ("mnist1d", ("branched-mlp", "nested-depth-mlp"))
  ]


@pytest.mark.parametrize("version", [results.VERSION + 1, "1", None])
def test_a_results_file_of_another_version_is_refused_by_name(
  version, tmp_path, capsys
):
  # A file from a newer osgd-compare (or a damaged version entry) is one
  # line naming both versions, never a KeyError deep in the report.
  path = tmp_path / "results.json"
  path.write_text(json.dumps({**HAND, "version": version}))
  assert compare.main(["--report", str(path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [
    f"osgd-compare: error: --report {path} is a results file of version"
    f" {version!r}, and this osgd-compare reads version {results.VERSION};"
    " report it with the osgd-compare that wrote it (a newer one: upgrade"
    " osgd-jax)."
  ]
  assert not (tmp_path / "report.md").exists()
  path.write_text(json.dumps(HAND))  # the current version is read
  assert results.load_results(str(path)) == HAND


def test_a_closed_stdout_is_one_line_and_running_again_continues(
  tmp_path, capsys, monkeypatch
):
  out = tmp_path / "cmp"
  args = [*TINY, "--optimizers", "sgd", "osgd", "--out", str(out)]
  fake = _FakeTraining()
  _no_model(monkeypatch, fake)
  with monkeypatch.context() as patch:
    patch.setattr(sys, "stdout", ReaderGoneAfter(lines=4))
    assert compare.main(args) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "stdout was closed before the end" in err[0], err
  assert f"the finished runs are kept in {out}" in err[0]
  assert "Run the same command again with its output to a file" in err[0]
  done = list(fake.calls)
  assert 0 < len(done) < 8
  assert compare.main(args) == 0  # the advice, output captured by pytest
  # Every run is made once: the finished ones are read, not trained again.
  assert len(fake.calls) == len(set(fake.calls)) == 8, fake.calls


def test_a_closed_stdout_after_a_report_is_one_line(tmp_path, capsys):
  results_file = tmp_path / "results.json"
  results_file.write_text(json.dumps(HAND))
  args = ["--report", str(results_file)]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sys, "stdout", ReaderGoneAfter(lines=0))
    assert compare.main(args) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "stdout was closed before the end" in err[0], err
  assert "the report's files were written" in err[0]
  assert (tmp_path / "report.md").is_file()
  assert compare.main(args) == 0  # the advice
  assert "wrote " in capsys.readouterr().out
