"""The local-attention study runner on its tiny matrix, one cell: masked-LM pre-training,
evaluation, fine-tuning a classifier from it and evaluating it, through the CLIs; the record and
report written, a finished cell skipped on a second run."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "experiments", "local_attention.py")
TINY = "configs/experiments/local_attention_tiny.gin"


def _run_study(out, *extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, RUNNER, f"--gin_file={TINY}", f"--out={out}",
                           "--only=blocks", *extra], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("local_attention"))
    first = _run_study(out)
    assert first.returncode == 0, first.stderr[-2000:]
    return out


def test_the_cell_record_holds_every_measurement(study):
    record = json.load(open(os.path.join(study, "cells", "blocks", "record.json")))
    assert record["masked_loss"] > 0 and 0 <= record["masked_accuracy"] <= 1
    assert 0 <= record["accuracy"] <= 1 and 0.5 <= record["majority_baseline"] < 1
    assert record["pretrain_us_per_token"] > 0 and record["finetune_temp_mib"] > 0
    assert record["keys_per_query"] == 8  # disjoint blocks of WINDOW=8
    assert record["finetune_length"] == 64
    for ext in ("md", "json", "csv", "png"):
        assert os.path.getsize(os.path.join(study, f"local_attention.{ext}")) > 0
    rows = json.load(open(os.path.join(study, "local_attention.json")))["rows"]
    assert [r["cell"] for r in rows] == ["blocks"]


def test_second_run_skips_the_finished_cell(study):
    log = os.path.join(study, "cells", "blocks", "log.txt")
    before = open(log).read()
    again = _run_study(study)
    assert again.returncode == 0 and "| blocks |" in again.stdout
    assert open(log).read() == before
