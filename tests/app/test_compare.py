"""``osgd-compare``: a tiny real comparison writes its table, JSON and figure;
run again, it skips what is done; a diverged run is a row, not a crash."""

from __future__ import annotations

import json

import numpy as np
import pytest

from osgd_jax.app import compare
from osgd_jax.app.train import TrainingDiverged

TINY = ["--models", "branched-mlp", "--epochs", "1", "--batch-size", "256"]


@pytest.mark.slow
def test_tiny_comparison_writes_table_json_and_figure(tmp_path, capsys):
  out = tmp_path / "cmp"
  status = compare.main(["--models", "branched-mlp", "--optimizers", "sgd", "osgd",
                         "--epochs", "1", "--seeds", "2", "--batch-size", "256",
                         "--out", str(out)])
  assert status == 0
  table = (out / "compare.md").read_text().splitlines()
  assert table[0].startswith("| model | optimizer | exit 1")
  assert [row.split("|")[2].strip() for row in table[2:]] == ["sgd", "osgd"]
  assert all(cell.count("±") == 1 for row in table[2:] for cell in row.split("|")[3:-1])
  results = json.loads((out / "compare.json").read_text())
  accuracy = results["accuracy"]["branched-mlp"]
  assert len(accuracy["osgd"]) == 2 and len(accuracy["osgd"][0]) == 4  # seeds x exits
  assert (out / "compare-branched-mlp.png").stat().st_size > 0
  printed = capsys.readouterr().out
  assert "branched-mlp | osgd" in printed
  assert "[4/4] branched-mlp, osgd, seed 1: trained" in printed
  # The same command again: nothing is trained twice, the table is the same.
  assert compare.main(["--models", "branched-mlp", "--optimizers", "sgd", "osgd",
                       "--epochs", "1", "--seeds", "2", "--batch-size", "256",
                       "--out", str(out)]) == 0
  again = capsys.readouterr().out
  assert again.count(": skipped in") == 4 and "trained" not in again
  assert (out / "compare.md").read_text().splitlines() == table


def test_bad_seed_count_is_one_line_error(tmp_path, capsys):
  assert compare.main(["--seeds", "0", "--out", str(tmp_path)]) == 2
  assert "--seeds must be >= 1" in capsys.readouterr().err


def test_mnist1d_is_checked_against_each_model(tmp_path, capsys, monkeypatch):
  # The default models are ResNets: refused before any run.
  assert compare.main(["--dataset", "mnist1d", "--out", str(tmp_path)]) == 2
  assert "--model branched-resnet convolves 2-D images" in (
      capsys.readouterr().err)
  # MLPs are accepted, although the shared settings' own model is a ResNet.
  runs = []

  def recorded(base, models, optimizers, seeds):
    runs.append((base.dataset, tuple(models)))
    return {m: {o: np.full((len(seeds), 4), 0.5) for o in optimizers}
            for m in models}

  monkeypatch.setattr(compare, "compare", recorded)
  assert compare.main(["--dataset", "MNIST-1D", "--models", "branched-mlp",
                       "nested-depth-mlp", "--out", str(tmp_path)]) == 0
  assert runs == [("mnist1d", ("branched-mlp", "nested-depth-mlp"))]


def test_diverged_and_interrupted_runs(tmp_path, capsys, monkeypatch):
  out = tmp_path / "cmp"
  args = [*TINY, "--optimizers", "sgd", "--seeds", "2", "--out", str(out)]
  real_train = compare.train

  def faulty(config):
    if config.seed == 1:
      if config.resume:  # the second call, resuming an interrupted run
        raise TrainingDiverged("non-finite loss at epoch 1, step 2")
      raise KeyboardInterrupt
    return real_train(config)

  monkeypatch.setattr(compare, "train", faulty)
  assert compare.main(args) == 130
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "Run the same command again to continue" in err[0]
  assert json.loads((out / "branched-mlp" / "sgd" / "seed0" /
                     compare.RESULT_FILE).read_text())["status"] == "finished"
  # seed 1 left a checkpoint as an interrupted run would
  (out / "branched-mlp" / "sgd" / "seed1" / "checkpoints" / "1").mkdir(
      parents=True)
  assert compare.main(args) == 0
  printed = capsys.readouterr().out
  assert "seed 0: skipped" in printed and "seed 1: diverged" in printed
  table = (out / "compare.md").read_text().splitlines()
  assert "| branched-mlp | sgd (1/2 diverged) |" in table[2]
  results = json.loads((out / "compare.json").read_text())
  assert results["accuracy"]["branched-mlp"]["sgd"][1] is None
  # Recorded: a third call neither trains nor resumes the diverged run.
  monkeypatch.setattr(compare, "train", None)
  assert compare.main(args) == 0
  assert "seed 1: diverged" in capsys.readouterr().out


def test_a_directory_of_other_settings_is_refused(tmp_path, capsys):
  out = tmp_path / "cmp"
  run = out / "branched-mlp" / "sgd" / "seed0"
  run.mkdir(parents=True)
  config = compare.TrainConfig(model="branched-mlp", optimizer="sgd",
                               epochs=3, out=str(run))
  (run / compare.RESULT_FILE).write_text(json.dumps(
      {"status": "finished", "config": config.to_json(),
       "test_accuracy": [0.5] * 4}))
  assert compare.main([*TINY, "--optimizers", "sgd", "--seeds", "1",
                       "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert "holds a finished run with other settings" in err
  assert "--batch-size was 64, now 256; --epochs was 3, now 1)" in err
  assert "its settings or a new --out" in err
