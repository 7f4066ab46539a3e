"""``osgd-train --dataset text``: an early-exit language model end to end.

The run is the command's ``main`` in this process on a text the test
writes, with the transformer's text preset shrunk to a tiny size (a context
of 16 bytes, width 8), so that it takes seconds; what it checks does not
depend on the size: the per-exit bits per byte, the token early-exit curve
and the record of the text in ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest

from osgd_jax.app.train import cli
from osgd_jax.zoo import registry

MODEL = "branched-transformer"
TINY = dict(width=8, depth=1, heads=1, length=16, stages=2, mlp_ratio=1)


@pytest.fixture
def tiny_text_preset(monkeypatch):
  preset = dict(registry._PRESETS[MODEL]["text"], **TINY)
  monkeypatch.setitem(registry._PRESETS[MODEL], "text", preset)


def _main(args, capsys):
  try:
    status = cli.main(list(args))
  except SystemExit as e:  # argparse's errors exit
    status = e.code
  captured = capsys.readouterr()
  return subprocess.CompletedProcess(args, status, captured.out, captured.err)


def _one_line_error(result, *fragments):
  assert result.returncode == 2, (result.returncode, result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def test_a_tiny_language_model_trains_and_reports_bits(
  tmp_path, capsys, tiny_text_preset
):
  text = tmp_path / "corpus.txt"
  text.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 40)
  out = tmp_path / "run"
  result = _main(
    [
      "--dataset",
      "text",
      "--text-file",
      str(text),
      "--model",
      MODEL,
      "--epochs",
      "2",
      "--batch-size",
      "16",
      "--lr",
      "0.1",
      "--out",
      str(out),
      "--no-progress",
    ],
    capsys,
  )
  assert result.returncode == 0, result.stderr
  assert "bits/byte" in result.stdout and "bits_vs_flops.png" in result.stdout
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["data"]["source"] == "file"
  assert metrics["data"]["path"] == str(text)
  assert metrics["data"]["context"] == 16
  final, last = metrics["final"], metrics["epochs"][-1]
  np.testing.assert_allclose(
    final["test_bits_per_byte"], np.asarray(last["test_loss"]) / math.log(2)
  )
  np.testing.assert_allclose(
    last["train_bits_per_byte"], np.asarray(last["train_loss"]) / math.log(2)
  )
  # The text repeats: two epochs already beat a uniform guess (8 bits).
  assert max(final["test_bits_per_byte"]) < 8.0
  np.testing.assert_allclose(
    final["flops_per_token"], np.asarray(final["flops"]) / 16
  )
  curve = final["early_exit"]
  assert curve["mean_exit"][0] == 1.0 and curve["mean_exit"][-1] <= 2.0
  # Threshold 0 answers every token with exit 1: its bits are exit 1's.
  np.testing.assert_allclose(
    curve["bits_per_byte"][0], final["test_bits_per_byte"][0], rtol=1e-5
  )
  np.testing.assert_allclose(
    curve["mean_flops"][0], final["flops_per_token"][0]
  )
  assert np.all(np.diff(curve["mean_exit"]) >= 0)
  assert (out / "bits_vs_flops.png").read_bytes()[:4] == b"\x89PNG"


def test_the_text_data_set_defaults_to_an_early_exit_transformer():
  config = cli.config_from_args(["--dataset", "text"])
  assert (config.model, config.preset_name) == (MODEL, "text")
  assert config.text_file is None  # the standard-library text


@pytest.mark.parametrize(
  "args, fragments",
  [
    (
      ["--text-file", "corpus.txt"],
      ["--text-file is the text of --dataset text", "add --dataset text"],
    ),
    (
      ["--dataset", "text", "--model", "nested-depth-mlp"],
      ["has no text preset", "nested-depth-transformer", f"out for {MODEL}"],
    ),
    (
      ["--dataset", "text", "--model", MODEL, "--text-file", ""],
      ["--text-file must be a non-empty path"],
    ),
    (
      ["--dataset", "text", "--model", MODEL, "--text-file", "/no/such"],
      ["--text-file /no/such does not exist or is not a file"],
    ),
  ],
)
def test_bad_text_input_is_one_line_and_status_2(
  tmp_path, capsys, args, fragments
):
  out = ["--out", str(tmp_path / "run")]
  _one_line_error(_main([*args, *out], capsys), *fragments)


@pytest.mark.parametrize(
  "content, fragment",
  [(b"", "is empty"), (b"short text", "holds 10 bytes, too few")],
)
def test_an_empty_or_short_text_file_is_one_line(
  tmp_path, capsys, content, fragment
):
  text = tmp_path / "corpus.txt"
  text.write_bytes(content)
  args = ["--dataset", "text", "--model", MODEL, "--text-file", str(text)]
  _one_line_error(
    _main([*args, "--out", str(tmp_path / "run")], capsys), fragment
  )
