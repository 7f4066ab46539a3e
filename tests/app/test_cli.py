"""``osgd-train`` end to end: artefacts and one-line errors.

The default run goes through a subprocess, as a user starts it. The other
cases call the command's ``main`` in this process, which returns the exit
status; one bad flag also runs in a subprocess of its own, for the process's
real exit status and stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from osgd_jax.app import cli

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")


def _run(*args, timeout=600):
  # The command module itself: the app extra check in front of it (the
  # console script's, tests/app/test_entry_points.py) would only add its
  # imports to every run here.
  return subprocess.run([sys.executable, "-m", "osgd_jax.app.cli", *args],
                        capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.mark.slow
def test_default_run_shortened(tmp_path):
  # The default model, data and optimizer; only the length is cut.
  out = tmp_path / "run"
  result = _run("--epochs", "4", "--out", str(out), "--no-progress")
  assert result.returncode == 0, result.stderr
  assert "test acc" in result.stdout and "FLOPs" in result.stdout
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["config"]["model"] == "nested-depth-resnet"
  assert metrics["config"]["optimizer"] == "osgd"
  assert len(metrics["epochs"]) == 4
  for record in metrics["epochs"]:
    assert len(record["train_loss"]) == 4 and record["step_time_s"] > 0
  accuracy = metrics["final"]["test_accuracy"]
  assert min(accuracy) > 0.5, accuracy  # chance is 0.1
  assert (out / "accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(out / "checkpoints")) == ["3", "4"]


def _assert_one_line_error(result, *fragments):
  assert result.returncode == 2, (result.returncode, result.stderr)
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def _main_in_process(args, capsys):
  """``(status, stderr)`` of ``osgd-train args`` run by its ``main``."""
  try:
    status = cli.main(list(args))
  except SystemExit as e:  # argparse's errors exit
    status = e.code
  return subprocess.CompletedProcess(args, status, "", capsys.readouterr().err)


@pytest.mark.parametrize("args, fragments", [
    (["--model", "resnet-1000"], ["--model", "invalid choice", "nested-depth-resnet"]),
    (["--dataset", "mnist"], ["--dataset", "invalid choice", "cifar10"]),
    (["--optimizer", "adam"], ["--optimizer", "invalid choice", "osgd"]),
    (["--lr", "fast"], ["--lr", "invalid float"]),
    (["--lr", "-1"], ["--lr must be > 0"]),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"],
     ["cifar-10-python.tar.gz", "/nonexistent/cifar", "cs.toronto.edu"]),
    (["--out", "/proc/osgd-cannot-write"], ["cannot write to --out"]),
])
def test_bad_input_gives_one_line_and_status_2(args, fragments, capsys):
  _assert_one_line_error(_main_in_process(args, capsys), *fragments)


def test_bad_input_in_a_process_of_its_own():
  _assert_one_line_error(_run("--lr", "-1"), "--lr must be > 0")


def test_config_file_and_unknown_key(tmp_path, capsys):
  bad = tmp_path / "bad.yaml"
  bad.write_text("epochs: 1\nlearning_rate: 0.1\n")
  _assert_one_line_error(_main_in_process(["--config", str(bad)], capsys),
                         "unknown key(s) ['learning_rate']")
  broken = tmp_path / "broken.json"
  broken.write_text("{epochs: ")
  _assert_one_line_error(_main_in_process(["--config", str(broken)], capsys),
                         "not valid JSON")


def test_corrupt_checkpoint_on_resume(tmp_path, capsys):
  out = tmp_path / "run"
  args = ["--model", "branched-mlp", "--epochs", "1", "--no-progress",
          "--out", str(out)]
  assert _main_in_process(args, capsys).returncode == 0
  for root, _, files in os.walk(out / "checkpoints" / "1"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  _assert_one_line_error(
      _main_in_process(args + ["--epochs", "2", "--resume"], capsys),
      "corrupt", "without --resume")
