"""``osgd-train`` end to end: artefacts, interrupts, and one line per fault.

Each kind of fault runs once in a subprocess, as a user meets it, for the
process's real exit status and stderr: Ctrl-C during the default run, a bad
value in a config file, a damaged checkpoint and a full disk. The other
cases call the command's ``main`` in this process, which returns the exit
status. Where a message gives advice, the test follows it literally and
checks that nothing good was lost.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
from closed_pipe import ReaderGoneAfter

from osgd_jax.app.train import cli

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
# The command module itself: the app extra check in front of it (the console
# script's, tests/app/test_commands.py) would only add its imports.
COMMAND = [sys.executable, "-m", "osgd_jax.app.train.cli"]
# The fault tests' run: none of them depends on the model, the data or the
# optimizer. SGD's step compiles in a fraction of OSGD's time, and the
# synthetic data spare each process scikit-learn's import (digits').
SMALL_RUN = [
  "--model",
  "branched-mlp",
  "--dataset",
  "synthetic",
  "--optimizer",
  "sgd",
  "--batch-size",
  "256",
  "--no-progress",
]
# The command as a terminal runs it, with Ctrl-C's SIGINT handled by Python.
# A command started in the background of a non-interactive shell (`cmd &`,
# which may be how this suite was started) inherits SIGINT ignored, and
# Python then leaves it ignored: a SIGINT sent to it would change nothing.
AT_A_TERMINAL = [
  sys.executable,
  "-c",
  "import runpy, signal, sys;"
  " signal.signal(signal.SIGINT, signal.default_int_handler);"
  " sys.argv = ['osgd-train', *sys.argv[1:]];"
  " runpy.run_module('osgd_jax.app.train.cli', run_name='__main__')",
]


def _run(*args, timeout=600, command=COMMAND):
  return subprocess.run(
    [*command, *args], capture_output=True, text=True, timeout=timeout, env=ENV
  )


def _as_subprocess(command_line: str) -> list[str]:
  """A command an error message advises, as this test can run it."""
  words = shlex.split(command_line)
  return [*COMMAND, *words[1:]] if words[0] == "osgd-train" else words


def _assert_one_line_error(result, *fragments, status=2):
  assert result.returncode == status, (result.returncode, result.stderr)
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


def _main_in_process(args, capsys):
  """``(status, stderr)`` of ``osgd-train args`` run by its ``main``."""
  try:
    status = cli.main(list(args))
  except SystemExit as e:  # argparse's errors exit
    status = e.code
  return subprocess.CompletedProcess(args, status, "", capsys.readouterr().err)


@pytest.mark.slow
def test_default_run_interrupted_then_resumed_as_advised(tmp_path):
  # The README's main job, `osgd-train` with no flags (tests/test_readme.py
  # checks that it is): the default model, data and optimizer; only the
  # length is cut. Ctrl-C after epoch 1 ends with one line whose command,
  # run as written, finishes the run.
  out = tmp_path / "run"
  # JAX's compilation cache, shared by the two processes: the resumed run
  # loads the step and the evaluation the first one compiled.
  env = dict(
    ENV,
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  process = subprocess.Popen(
    [*AT_A_TERMINAL, "--epochs", "3", "--out", str(out), "--no-progress"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
  )
  first = process.stdout.readline()
  assert first == f"run directory: {out}\n", first
  for line in process.stdout:
    if line.startswith("epoch 1/3"):
      process.send_signal(signal.SIGINT)
      break
  _, stderr = process.communicate(timeout=300)
  interrupted = subprocess.CompletedProcess([], process.returncode, "", stderr)
  line = _assert_one_line_error(interrupted, str(out), status=130)
  # Epoch 2 takes a few seconds: on a loaded machine, it may be done and
  # saved before the signal arrives.
  assert re.search(
    r": interrupted; (epoch 1 is|epochs 1-2 are) saved in ", line
  ), line
  resume = line.split("Resume with: ")[1]
  assert resume == shlex.join(
    [
      "osgd-train",
      "--epochs",
      "3",
      "--no-progress",
      "--out",
      str(out),
      "--resume",
    ]
  )
  result = subprocess.run(
    _as_subprocess(resume), capture_output=True, text=True, env=env, timeout=600
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert "nested-depth-resnet on digits, optimizer osgd, 3 epochs" in lines
  assert "FLOPs" in result.stdout
  assert any(line.startswith("exit  test acc") for line in lines)
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["config"]["model"] == "nested-depth-resnet"
  assert metrics["config"]["optimizer"] == "osgd"
  assert [r["epoch"] for r in metrics["epochs"]] == [1, 2, 3]
  for record in metrics["epochs"]:
    assert len(record["train_loss"]) == 4 and record["step_time_s"] > 0
  accuracy = metrics["final"]["test_accuracy"]
  assert min(accuracy) > 0.5, accuracy  # chance is 0.1
  assert (out / "accuracy_vs_flops.png").read_bytes()[
    :8
  ] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((out / "config.json").read_text())["epochs"] == 3
  assert sorted(os.listdir(out / "checkpoints")) == ["2", "3"]


@pytest.mark.parametrize(
  "args, fragments",
  [
    (
      ["--model", "resnet-1000"],
      ["--model", "invalid choice", "nested-depth-resnet"],
    ),
    (["--dataset", "mnist"], ["--dataset", "invalid choice", "cifar10"]),
    (["--dataset", "Cifar10"], ["--dataset", "invalid choice", "CIFAR-10"]),
    (
      ["--dataset", "mnist1d", "--model", "branched-resnet"],
      [
        "--model branched-resnet cannot read --dataset mnist1d's inputs (it"
        " has no mnist1d preset); choose one that can:",
        "nested-depth-conv1d",
        "nested-depth-mlp",
        "leave --model out for nested-depth-conv1d",
      ],
    ),
    (["--optimizer", "adam"], ["--optimizer", "invalid choice", "osgd"]),
    (["--lr", "fast"], ["--lr", "invalid float"]),
    (["--lr", "-1"], ["--lr must be a finite number > 0, got -1.0"]),
    (["--lr", "nan"], ["--lr must be a finite number > 0, got nan"]),
    (["--weight-decay", "nan"], ["--weight-decay must be a finite number"]),
    (["--momentum", "inf"], ["--momentum must be a finite number in [0, 1)"]),
    (["--seed", "-1"], ["--seed must be an integer from 0 to 4294967295"]),
    (["--seed", "99999999999"], ["--seed must be an integer"]),
    (["--epochs", "1000000"], ["--epochs must be an integer from 1 to 100000"]),
    (["--out", ""], ["--out must be a non-empty path"]),
    (["--exit-weights", "0,0,0,0"], ["are all zero: no exit would be trained"]),
    (["--resume"], ["--resume needs the --out directory"]),
    (
      ["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"],
      ["cifar-10-python.tar.gz", "/nonexistent/cifar", "cs.toronto.edu"],
    ),
    (["--out", "/proc/osgd-cannot-write"], ["cannot write to --out"]),
  ],
)
def test_bad_input_gives_one_line_and_status_2(args, fragments, capsys):
  _assert_one_line_error(_main_in_process(args, capsys), *fragments)


def test_a_bad_config_value_in_a_process_of_its_own(tmp_path):
  config = tmp_path / "run.yaml"
  config.write_text("epochs: 2.5\n")
  _assert_one_line_error(
    _run("--config", str(config)),
    "--epochs must be an integer from 1 to 100000, got 2.5",
  )
  assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
  "text, fragments",
  [
    ("epochs: 1\nlearning_rate: 0.1\n", ["unknown key(s) ['learning_rate']"]),
    ("model: 3\n", ["unknown --model 3"]),
    ("progress: 'yes'\n", ["progress must be true or false"]),
    ("weight_decay: .nan\n", ["--weight-decay must be a finite number >= 0"]),
    ("epochs: ten\n", ["--epochs", "invalid int value: 'ten'"]),
    ("exit_weights: [0, 0, 0, 0]\n", ["are all zero"]),
    ("dataset: Cifar10\n", ["unknown dataset 'Cifar10'", "CIFAR-10"]),
    ("out: ''\n", ["--out must be a non-empty path"]),
    ("- epochs\n", ["must hold a mapping of flag names to values"]),
  ],
)
def test_config_file_values_are_checked_like_flags(
  tmp_path, capsys, text, fragments
):
  config = tmp_path / "run.yaml"
  config.write_text(text)
  _assert_one_line_error(
    _main_in_process(["--config", str(config)], capsys), *fragments
  )
  assert not (tmp_path / "runs").exists()


def test_broken_config_file(tmp_path, capsys):
  broken = tmp_path / "broken.json"
  broken.write_text("{epochs: ")
  _assert_one_line_error(
    _main_in_process(["--config", str(broken)], capsys), "not valid JSON"
  )


def test_dataset_aliases_pick_the_datasets_preset(tmp_path):
  config = tmp_path / "run.yaml"
  config.write_text("dataset: CIFAR-10\n")
  for args in (["--dataset", "CIFAR-10"], ["--config", str(config)]):
    parsed = cli.config_from_args(args)
    assert (parsed.dataset, parsed.preset_name) == ("cifar10", "cifar")


def test_damaged_checkpoint_is_one_line_and_moving_it_aside_resumes(
  tmp_path, capsys
):
  out = tmp_path / "run"
  args = [*SMALL_RUN, "--epochs", "2", "--out", str(out)]
  assert _main_in_process(args, capsys).returncode == 0
  first = json.loads((out / "metrics.json").read_text())["final"]
  for root, _, files in os.walk(out / "checkpoints" / "2"):
    for name in files:
      if name not in ("commit_success.txt", "_CHECKPOINT_METADATA"):
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(10)
  # In a process of its own: no "Event loop is closed" noise after the line.
  line = _assert_one_line_error(
    _run(*args, "--resume"),
    "checkpoints/2 cannot be read",
    "it is damaged",
    "To resume from the checkpoint of epoch 1 instead",
  )
  advice = line.split("(nothing is deleted): ")[1]
  assert advice.startswith("mv ")
  assert subprocess.run(shlex.split(advice)).returncode == 0
  assert (out / "damaged-checkpoint-2").is_dir()  # kept, not deleted
  assert _main_in_process([*args, "--resume"], capsys).returncode == 0
  # Epoch 2 again, from epoch 1's checkpoint: the same result as before.
  assert json.loads((out / "metrics.json").read_text())["final"] == first


# The command in a process whose writes beyond 50 kB fail (EFBIG), as they
# would on a full disk, instead of killing it (SIGXFSZ).
WITH_FULL_DISK = [
  sys.executable,
  "-c",
  (
    "import resource, runpy, signal, sys;"
    " signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
    " resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000));"
    " sys.argv[0] = 'osgd-train';"
    " runpy.run_module('osgd_jax.app.train.cli', run_name='__main__')"
  ),
]


def test_full_disk_is_one_line_and_running_again_works(tmp_path, capsys):
  out = tmp_path / "run"
  # The damaged-checkpoint test's run: in one worker, its step is compiled
  # once for both.
  args = [*SMALL_RUN, "--epochs", "2", "--out", str(out)]
  line = _assert_one_line_error(
    _run(*args, command=WITH_FULL_DISK),
    "could not write the checkpoint of epoch 1",
    "File too large [errno 27]",
    "no earlier checkpoint exists",
    status=1,
  )
  assert "then run the command again" in line
  # Resuming instead is refused, with advice that amounts to the same.
  _assert_one_line_error(
    _main_in_process([*args, "--resume"], capsys),
    "no checkpoint to resume from",
    "run without --resume to start a new run",
  )
  assert _main_in_process(args, capsys).returncode == 0  # the advice
  assert sorted(os.listdir(out / "checkpoints")) == ["1", "2"]


def test_a_closed_stdout_is_one_line_and_its_advice_resumes(
  tmp_path, capsys, monkeypatch
):
  # Not the file system's fault: no "fix the file system" advice. The reader
  # leaves after epoch 1's line, when epoch 1 is saved.
  out = tmp_path / "run"
  args = [*SMALL_RUN, "--epochs", "2", "--out", str(out)]
  with monkeypatch.context() as patch:
    patch.setattr(sys, "stdout", ReaderGoneAfter(lines=2))
    closed = _main_in_process(args, capsys)
  line = _assert_one_line_error(
    closed,
    "stdout was closed before the end",
    f"the checkpoints of finished epochs are kept in {out}",
    status=1,
  )
  assert "file system" not in line
  advice, log = line.split("Resume with the output to a file: ")[1].split(" > ")
  assert shlex.split(advice)[-1] == "--resume" and log == str(out / "train.log")
  assert _main_in_process(shlex.split(advice)[1:], capsys).returncode == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert [r["epoch"] for r in metrics["epochs"]] == [1, 2]


def test_resume_command_round_trips_awkward_arguments():
  argv = ["--config", "my run.yaml", "--out", "old", "--lr", "0.1", "--resume"]
  command = cli.resume_command(argv, "/runs/new dir")
  assert shlex.split(command) == [
    "osgd-train",
    "--config",
    "my run.yaml",
    "--lr",
    "0.1",
    "--out",
    "/runs/new dir",
    "--resume",
  ]
  assert (
    cli.resume_command(["--out=y", "--seed", "1"], "/runs/x", resume=False)
    == "osgd-train --seed 1 --out /runs/x"
  )


def test_the_papers_options_and_the_loop_flags_reach_the_config():
  config = cli.config_from_args(
    [
      "--rescale",
      "--switch-to-sgd",
      "0.8",
      "--granularity",
      "global",
      "--log-every",
      "7",
      "--tensorboard",
      "tb",
      "--validation",
      "0.2",
    ]
  )
  assert (
    config.rescale,
    config.switch_to_sgd,
    config.granularity,
    config.log_every,
    config.tensorboard,
    config.validation,
  ) == (True, 0.8, "global", 7, "tb", 0.2)
  default = cli.config_from_args([])
  assert (default.rescale, default.switch_to_sgd, default.validation) == (
    False,
    None,
    0.0,
  )


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_paper_scale_configs_are_valid_and_flags_override_them(dataset):
  path = os.path.join(
    os.path.dirname(__file__), "..", "..", "configs", f"{dataset}.yaml"
  )
  config = cli.config_from_args(["--config", path])
  assert (config.dataset, config.preset, config.optimizer) == (
    dataset,
    "cifar",
    "osgd",
  )
  assert (
    config.epochs,
    config.batch_size,
    config.lr,
    config.schedule,
    config.momentum,
    config.weight_decay,
    config.mesh,
  ) == (200, 128, 0.1, "step", 0.9, 5e-4, "data=-1")
  # The documented command's optional flags win over the file.
  override = cli.config_from_args(
    ["--config", path, "--model", "branched-resnet", "--optimizer", "sgd"]
  )
  assert (override.model, override.optimizer) == ("branched-resnet", "sgd")


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_vit_configs_are_valid_transformer_runs(dataset):
  path = os.path.join(
    os.path.dirname(__file__), "..", "..", "configs", f"{dataset}-vit.yaml"
  )
  config = cli.config_from_args(["--config", path])
  config.validate()
  assert (config.dataset, config.model, config.preset, config.mesh) == (
    dataset,
    "nested-depth-transformer",
    "cifar",
    "data=-1",
  )


def test_text_lm_config_is_a_valid_language_model_run():
  path = os.path.join(
    os.path.dirname(__file__), "..", "..", "configs", "text-lm.yaml"
  )
  config = cli.config_from_args(["--config", path])
  config.validate()
  assert (config.dataset, config.preset, config.text_file) == (
    "text",
    "text",
    None,
  )
