"""The study runner on a tiny matrix: one training run evaluated three ways (plain, BCA, a
sliding window of the training length); report files written, finished cells skipped on a second
run."""
import json
import os
import subprocess
import sys

import pytest

from helpers import study_runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "experiments", "extrapolation.py")
TINY = "configs/experiments/extrapolation_tiny.gin"


def _run_study(out, *extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, RUNNER, f"--gin_file={TINY}", f"--out={out}", *extra],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study"))
    first = _run_study(out)
    assert first.returncode == 0, first.stderr[-2000:]
    return out, first


def test_report_has_a_row_per_cell_and_every_length(study):
    out, _ = study
    for ext in ("md", "csv", "json", "png"):
        assert os.path.getsize(os.path.join(out, f"extrapolation.{ext}")) > 0
    rows = json.load(open(os.path.join(out, "extrapolation.json")))["rows"]
    assert [r["cell"] for r in rows] == ["transformer/alibi", "transformer/alibi+bca",
                                         "transformer/alibi+window"]
    for row in rows:
        assert row["ppl@16"] > 1 and row["ppl@32"] > 1


@pytest.mark.parametrize("suffix", ["bca", "window"])
def test_inference_mask_cell_reuses_the_trained_run_and_changes_only_longer_lengths(study,
                                                                                    suffix):
    """At length 16 = TRAIN_LENGTH a query sees its whole causal past under BCA (blocks of 8: its
    block and the previous one) and under a window of 16 keys, so the evaluations agree with the
    plain one; at 32 they differ from it and from each other."""
    out, _ = study
    rows = {r["cell"]: r for r in json.load(open(os.path.join(out, "extrapolation.json")))["rows"]}
    plain, masked = rows["transformer/alibi"], rows[f"transformer/alibi+{suffix}"]
    other = rows["transformer/alibi+" + ("window" if suffix == "bca" else "bca")]
    assert masked["ppl@16"] == pytest.approx(plain["ppl@16"], rel=1e-5)
    assert masked["ppl@32"] != pytest.approx(plain["ppl@32"], rel=1e-6)
    assert masked["ppl@32"] != pytest.approx(other["ppl@32"], rel=1e-6)
    assert len(os.listdir(os.path.join(out, "cells"))) == 1


def test_unknown_cell_suffix_is_refused():
    Cell = study_runner("extrapolation").Cell
    assert Cell.parse("transformer/rope+window").name == "transformer/rope+window"
    with pytest.raises(ValueError, match=r"\+slide"):
        Cell.parse("transformer/rope+slide")


def test_second_run_skips_finished_cells(study):
    out, _ = study
    log = os.path.join(out, "cells", "transformer__alibi", "log.txt")
    before = open(log).read()
    second = _run_study(out)
    assert second.returncode == 0, second.stderr[-2000:]
    assert open(log).read() == before  # nothing trained or evaluated again
    assert "transformer/alibi+bca" in second.stdout
