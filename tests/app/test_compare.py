"""``osgd-compare``: a tiny real comparison writes its table, JSON and figure."""

from __future__ import annotations

import json

import pytest

from osgd_jax.app import compare


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
  assert "branched-mlp | osgd" in capsys.readouterr().out


def test_bad_seed_count_is_one_line_error(tmp_path, capsys):
  assert compare.main(["--seeds", "0", "--out", str(tmp_path)]) == 2
  assert "--seeds must be >= 1" in capsys.readouterr().err
