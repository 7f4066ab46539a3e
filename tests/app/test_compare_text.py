"""A language model's comparison: the ``text-small`` preset, ``--text-bytes``
and ``osgd-compare --dataset text`` scored by bits per byte.

The presets, options and their errors are checked without training; the
tables of a hand-written results file against independent NumPy figures;
and one tiny real comparison (the ``text-small`` preset shrunk to a context
of 16 bytes, on a text the test writes) round-trips through
``results.json``, choosing the rate of the fewest bits.
"""

from __future__ import annotations

import copy
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from osgd_jax import anytime, zoo
from osgd_jax.app import compare
from osgd_jax.app.compare import experiment, results, runs, tables, variants
from osgd_jax.app.compare.metric import METRICS, metric_of
from osgd_jax.app.data.text import load_text
from osgd_jax.app.train import TrainConfig, check_resumable, cli, load_data
from osgd_jax.zoo import registry

MODEL = "branched-transformer"
TRANSFORMERS = [n for n in zoo.names() if n.endswith("-transformer")]
BITS = METRICS["bits_per_byte"]


def _text(tmp_path, size=2000):
  path = tmp_path / "corpus.txt"
  pattern = b"the quick brown fox jumps over the lazy dog. "
  path.write_bytes((pattern * (size // len(pattern) + 1))[:size])
  return path


def _one_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "Traceback" not in err[0], err
  return err[0]


def _train_status(args) -> int:
  try:
    return cli.main(list(args))
  except SystemExit as e:  # argparse's errors exit
    return int(e.code or 0)


# --- the text-small preset --------------------------------------------------


def test_text_small_is_a_smaller_language_model_of_every_transformer():
  for name in TRANSFORMERS:
    spec = zoo.input_spec(name, "text-small")
    assert (spec.shape, spec.dtype) == ((64,), jnp.int32), name
    small, full = zoo.presets(name)["text-small"], zoo.presets(name)["text"]
    assert small["width"] * 2 == full["width"], name
    assert (small["causal"], small["vocab"], small["stages"]) == (True, 256, 4)
  # Half the width and context: a quarter of the blocks' parameters.
  small, full = (
    nnx.eval_shape(lambda p=p: zoo.create(MODEL, rngs=nnx.Rngs(0), preset=p))
    for p in ("text-small", "text")
  )
  assert anytime.params_per_exit(small)[-1] < anytime.params_per_exit(full)[-1]


def test_osgd_train_reads_the_text_in_text_small_windows(tmp_path):
  text = _text(tmp_path)
  config = cli.config_from_args(
    ["--dataset", "text", "--preset", "text-small", "--text-file", str(text)]
  )
  assert (config.model, config.preset_name) == (MODEL, "text-small")
  dataset = load_data(config)
  # 1800 training bytes make (1800 - 1) // 64 = 28 windows of 64.
  assert dataset.x_train.shape == (28, 64)
  tokens = np.frombuffer(text.read_bytes(), np.uint8)
  np.testing.assert_array_equal(dataset.x_train[1], tokens[64:128])
  np.testing.assert_array_equal(dataset.y_train[1], tokens[65:129])


@pytest.mark.parametrize(
  "args, fragments",
  [
    (
      ["--dataset", "text", "--preset", "digits"],
      [
        "--preset digits of branched-transformer does not read --dataset"
        " text's inputs; choose one that does: text, text-small, or leave"
        " out --preset"
      ],
    ),
    (
      ["--dataset", "digits", "--model", MODEL, "--preset", "text-small"],
      [
        "--preset text-small of branched-transformer does not read"
        " --dataset digits's inputs; choose one that does: digits, cifar,"
        " mnist1d"
      ],
    ),
    (
      ["--dataset", "mnist1d", "--preset", "text-small"],
      ["unknown --preset 'text-small' for nested-depth-conv1d"],
    ),
    (
      ["--dataset", "digits", "--text-bytes", "1000"],
      [
        "--text-bytes limits the text of --dataset text, not --dataset"
        " digits; add --dataset text, or leave out --text-bytes."
      ],
    ),
    (
      ["--dataset", "text", "--text-bytes", "0"],
      ["--text-bytes must be an integer from 1 to"],
    ),
  ],
)
def test_a_preset_or_text_limit_that_does_not_fit_is_one_line(
  tmp_path, capsys, args, fragments
):
  assert _train_status([*args, "--out", str(tmp_path / "run")]) == 2
  line = _one_line(capsys)
  for fragment in fragments:
    assert fragment in line, line
  assert not (tmp_path / "run").exists()


def test_a_run_resumes_only_with_its_preset_and_text_limit():
  saved = TrainConfig(
    dataset="text", preset="text-small", text_bytes=5000
  ).to_json()
  check_resumable(
    saved, TrainConfig(dataset="text", preset="text-small", text_bytes=5000)
  )
  with pytest.raises(ValueError, match="--preset was 'text-small', now None"):
    check_resumable(saved, TrainConfig(dataset="text", text_bytes=5000))
  with pytest.raises(ValueError, match="--text-bytes was 5000, now 6000"):
    check_resumable(
      saved, TrainConfig(dataset="text", preset="text-small", text_bytes=6000)
    )


# --- --text-bytes -----------------------------------------------------------


def test_text_bytes_keeps_the_first_bytes_and_holds_out_their_tail(tmp_path):
  text = _text(tmp_path, size=3000)
  ds = load_text(text_file=text, context=8, max_bytes=1000)
  tokens = np.frombuffer(text.read_bytes()[:1000], np.uint8).astype(np.int32)
  # The last 100 of the 1000 bytes are the test text.
  train, test = tokens[:900], tokens[900:]
  n_train, n_test = (899 // 8, 99 // 8)
  np.testing.assert_array_equal(
    ds.x_train, train[: 8 * n_train].reshape(n_train, 8)
  )
  np.testing.assert_array_equal(
    ds.y_test, test[1 : 8 * n_test + 1].reshape(n_test, 8)
  )
  assert ds.info["max_bytes"] == 1000 and ds.info["bytes"] == 3000
  assert (ds.info["train_bytes"], ds.info["test_bytes"]) == (900, 100)
  # A limit beyond the text's end keeps all of it.
  whole = load_text(text_file=text, context=8, max_bytes=10_000)
  assert whole.info["train_bytes"] + whole.info["test_bytes"] == 3000


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "100"])
def test_text_bytes_must_be_a_positive_integer(tmp_path, bad):
  with pytest.raises(ValueError, match="max_bytes must be a positive integer"):
    load_text(text_file=_text(tmp_path), context=8, max_bytes=bad)


def test_too_few_text_bytes_names_the_least_that_works(tmp_path, capsys):
  args = [
    "--dataset", "text", "--preset", "text-small", "--text-bytes", "100",
    "--text-file", str(_text(tmp_path)), "--out", str(tmp_path / "run"),
  ]  # fmt: skip
  assert _train_status(args) == 2
  line = _one_line(capsys)
  assert line.endswith(
    "--text-bytes 100 keeps too few bytes for a training and a test window"
    " of 64 bytes with 0.1 of them held out for testing; pass --text-bytes"
    " 650 or more."
  ), line
  # 650 bytes are enough: 65 test bytes hold one window of 64 + 1.
  ds = load_text(text_file=_text(tmp_path), context=64, max_bytes=650)
  assert (ds.num_train, ds.num_test) == (9, 1)


# --- osgd-compare's flags ---------------------------------------------------


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["--dataset", "text", "--models", MODEL, "--preset", "nope"],
      "unknown --preset 'nope' for branched-transformer; choose one of:",
    ),
    (
      ["--dataset", "digits", "--models", MODEL, "--preset", "text-small"],
      "--preset text-small of branched-transformer does not read --dataset"
      " digits's inputs",
    ),
    (
      ["--text-file", "corpus.txt"],
      "--text-file is the text of --dataset text, not of --dataset digits",
    ),
    (
      ["--text-bytes", "1000"],
      "--text-bytes limits the text of --dataset text, not --dataset digits",
    ),
    (
      ["--report", "results.json", "--preset", "text-small"],
      "leave out --preset, --out.",
    ),
    (
      ["--report", "results.json", "--text-file", "t", "--text-bytes", "9"],
      "leave out --text-file, --text-bytes, --out.",
    ),
  ],
)
def test_compare_refuses_bad_text_settings_in_one_line(
  tmp_path, capsys, args, message
):
  assert compare.main([*args, "--out", str(tmp_path / "cmp")]) == 2
  line = _one_line(capsys)
  assert message in line, line
  assert not (tmp_path / "cmp").exists()


# --- the tables of a language model's comparison ----------------------------


def _curve(bits_last: float) -> dict:
  """An early-exit curve of 2 exits at thresholds 0, 0.5, 0.7, 0.9, 1."""
  return {
    "threshold": [0.0, 0.5, 0.7, 0.9, 1.0],
    "mean_exit": [1.0, 1.2, 1.5, 1.8, 2.0],
    "mean_flops": [100.0, 120.0, 150.0, 180.0, 200.0],
    "bits_per_byte": [3.0, 2.9, 2.8, 2.7, bits_last],
    "accuracy": [0.3, 0.3, 0.3, 0.3, 0.3],
    "exit_counts": [[10, 0], [8, 2], [5, 5], [2, 8], [0, 10]],
  }


def _text_payload() -> dict:
  payload = copy.deepcopy(results.EXAMPLE)
  payload["settings"].update(
    dataset="text",
    metric="bits_per_byte",
    optimizers=["sgd", "osgd"],
    base_config={**payload["settings"]["base_config"], "preset": "text-small"},
  )
  entry = payload["models"]["branched-mlp"]
  entry["matched"] = None
  del entry["optimizers"]["sgd-matched"]
  sgd, osgd = entry["optimizers"]["sgd"], entry["optimizers"]["osgd"]
  sgd["grid"][0]["val_bits_per_byte"] = [3.2, 3.0]
  sgd["grid"][1]["val_bits_per_byte"] = [2.9, 2.7]
  osgd["grid"][0]["val_bits_per_byte"] = [3.1, 2.8]
  osgd["grid"][1]["val_bits_per_byte"] = None
  sgd["test_bits_per_byte"] = [[2.80, 2.60], [2.90, 2.50]]
  osgd["test_bits_per_byte"] = [[2.70, 2.62], [2.85, 2.44]]
  sgd["early_exit"] = [_curve(2.6), _curve(2.5)]
  osgd["early_exit"] = [_curve(2.62), None]
  return payload


def test_a_language_model_s_tables_show_bits_per_byte(tmp_path):
  payload = _text_payload()
  assert metric_of(payload) is BITS
  entry = payload["models"]["branched-mlp"]["optimizers"]
  # The rate of the fewest mean bits: sgd's 0.1 (2.8 < 3.1); osgd's only
  # finished rate.
  assert experiment.choose_rate(entry["sgd"]["grid"], BITS) == 0.1
  assert experiment.choose_rate(entry["osgd"]["grid"], BITS) == 0.01
  text = compare.render_markdown(payload)
  assert "`osgd-compare` on text (preset text-small)" in text
  assert "validation bits per byte" in text and "accuracy (%)" not in text
  assert "validating on its last 20% (its tail" in text
  lines = text.splitlines()
  # sgd: exit 1 mean 2.85, sd 0.0707; exit 2 2.55, sd 0.0707; mean 2.7, 0.
  row = next(line for line in lines if line.startswith("| branched-mlp | sgd"))
  assert row == (
    "| branched-mlp | sgd | 0.1 | 2.850 ± 0.071 | 2.550 ± 0.071"
    " | 2.700 ± 0.000 |"
  )
  # osgd − sgd per seed: exit 1 (−0.10, −0.05), exit 2 (+0.02, −0.06).
  diff = np.array([[-0.10, 0.02], [-0.05, -0.06]])
  t = 12.706204736174698  # Student t, 1 degree of freedom, 97.5%
  half = t * diff.std(axis=0, ddof=1) / math.sqrt(2)
  row = next(x for x in lines if x.startswith("| branched-mlp | osgd | 2 |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[3] == f"{diff[:, 0].mean():+.3f} ± {half[0]:.3f}"
  assert cells[4] == f"{diff[:, 1].mean():+.3f} ± {half[1]:.3f}"
  per_exit, overall = tables.paired_differences(payload)["branched-mlp"]["osgd"]
  assert overall.mean == pytest.approx(diff.mean(axis=1).mean(), abs=1e-12)
  assert per_exit[0].half_width == pytest.approx(half[0], rel=1e-9)
  # The grid: mean / last exit bits, the chosen rate starred.
  assert "| branched-mlp | 0.1 | 2.800 / 2.700 * | diverged |" in text
  assert "negative: fewer bits than `sgd`'s" in text


def test_the_early_exit_table_averages_the_seeds_curves():
  table = tables.early_exit_table(_text_payload())
  lines = table.splitlines()
  assert lines[0].startswith("| model | optimizer | p ≥ 0.5: exit")
  # sgd: two curves alike but their last bits; osgd: one curve (one None).
  assert lines[2] == (
    "| branched-mlp | sgd | 1.20 / 60% / 2.900 | 1.50 / 75% / 2.800"
    " | 1.80 / 90% / 2.700 |"
  )
  assert lines[3].startswith("| branched-mlp | osgd | 1.20 / 60% / 2.900")
  assert tables.early_exit_table(results.EXAMPLE) == ""


def test_a_results_file_of_an_unknown_metric_is_refused(tmp_path):
  payload = _text_payload()
  payload["settings"]["metric"] = "perplexity"
  path = tmp_path / "results.json"
  path.write_text(json.dumps(payload))
  with pytest.raises(ValueError, match="unknown metric 'perplexity'"):
    results.load_results(str(path))
  del payload["models"]["branched-mlp"]["optimizers"]["sgd"][
    "test_bits_per_byte"
  ]
  payload["settings"]["metric"] = "bits_per_byte"
  path.write_text(json.dumps(payload))
  with pytest.raises(ValueError, match="lacks 'test_bits_per_byte'"):
    results.load_results(str(path))


# --- a tiny real comparison -------------------------------------------------


@pytest.fixture
def tiny_text_small(monkeypatch):
  tiny = dict(width=8, depth=1, heads=1, length=16, stages=2, mlp_ratio=1)
  preset = dict(registry._PRESETS[MODEL]["text-small"], **tiny)
  monkeypatch.setitem(registry._PRESETS[MODEL], "text-small", preset)


@pytest.mark.slow
def test_a_tiny_text_comparison_chooses_the_fewest_bits(
  tmp_path, capsys, tiny_text_small
):
  text = _text(tmp_path, size=4000)
  out = tmp_path / "cmp"
  args = [
    "--dataset", "text", "--preset", "text-small", "--text-file", str(text),
    "--text-bytes", "3000", "--models", MODEL, "--optimizers", "sgd", "osgd",
    "--lr-grid", "0.1,0.5", "--seeds", "1", "--epochs", "1",
    "--batch-size", "16", "--out", str(out),
  ]  # fmt: skip
  assert compare.main(args) == 0
  printed = capsys.readouterr().out
  assert "bits per byte, last exit" in printed
  payload = json.loads((out / "results.json").read_text())
  assert payload["settings"]["metric"] == "bits_per_byte"
  assert payload["settings"]["base_config"]["text_bytes"] == 3000
  for name in ("sgd", "osgd"):
    result = payload["models"][MODEL]["optimizers"][name]
    grid = result["grid"]
    means = [np.mean(p["val_bits_per_byte"]) for p in grid]
    assert result["chosen_lr"] == grid[int(np.argmin(means))]["lr"]
    for seed in (0,):
      run = out / MODEL / name / "test" / f"lr{result['chosen_lr']!r}"
      final = json.loads((run / f"seed{seed}" / "metrics.json").read_text())[
        "final"
      ]
      assert result["test_bits_per_byte"][seed] == final["test_bits_per_byte"]
      assert result["test_accuracy"][seed] == final["test_accuracy"]
      assert result["early_exit"][seed] == final["early_exit"]
      assert final["flops_per_token"]  # the curve's FLOPs are per byte
  # The report is made from the file and reads in bits.
  assert {p.name for p in out.glob("*.png")} == {
    "differences.png",
    *(f"{kind}-{MODEL}.png" for kind in ("accuracy", "flops", "lr")),
  }
  report = (out / "report.md").read_text()
  assert "**Test bits per byte**" in report and "Token-level early" in report
  d = tables.paired_differences(payload)[MODEL]["osgd"][1]
  rows = {
    n: np.asarray(
      payload["models"][MODEL]["optimizers"][n]["test_bits_per_byte"]
    )
    for n in ("sgd", "osgd")
  }
  expected = (rows["osgd"].mean(axis=1) - rows["sgd"].mean(axis=1)).mean()
  assert (d.n, d.mean) == (1, pytest.approx(expected, abs=1e-12))
  # Asked again, a finished run is read from its result.json, bits and
  # curve included, and not trained.
  osgd = payload["models"][MODEL]["optimizers"]["osgd"]
  lr = osgd["chosen_lr"]
  config = variants.config_for(
    TrainConfig(
      dataset="text", preset="text-small", text_file=str(text),
      text_bytes=3000, epochs=1, batch_size=16, progress=False,
    ),
    "osgd", model=MODEL, lr=lr, seed=0, validation=0.0,
    out=str(out / MODEL / "osgd" / "test" / f"lr{lr!r}" / "seed0"),
  )  # fmt: skip
  status, record = runs.run_record(config)
  assert status == "skipped" and record is not None
  assert record["test_bits_per_byte"].tolist() == osgd["test_bits_per_byte"][0]
  assert record["early_exit"] == osgd["early_exit"][0]
