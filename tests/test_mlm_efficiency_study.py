"""The masked-LM efficiency study runner on its tiny matrix, one late-[MASK] cell: its pre-training
steps bought by the baseline's FLOPs budget, masked-LM evaluations at its own rate and at 15%,
a classifier fine-tuned from it (the decoder dropped) and evaluated, through the CLIs; the record
and report written."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "experiments", "mlm_efficiency.py")
TINY = "configs/experiments/mlm_efficiency_tiny.gin"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mlm_efficiency"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run([sys.executable, RUNNER, f"--gin_file={TINY}", f"--out={out}",
                          "--only=3ml"], cwd=REPO, capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def test_the_budget_sets_the_steps_and_the_record_holds_every_measurement(study):
    record = json.load(open(os.path.join(study, "cells", "3ml", "record.json")))
    assert record["steps"] == max(1, round(record["budget_flops"] / record["flops_per_step"]))
    assert record["step_flops_vs_baseline"] == pytest.approx(
        record["flops_per_step"] * 4 / record["budget_flops"])
    # the analytic count against XLA's count of the same compiled step (which adds elementwise
    # work and the optimizer)
    assert 0.6 < record["flops_per_step"] / record["xla_flops_per_step"] < 1.2
    assert record["mask_rate"] == 0.5 and record["insert_layer"] == 1
    assert record["masked_loss"] > 0 and record["masked_loss@compare"] > 0
    assert 0 <= record["accuracy"] <= 1 and 0.5 <= record["majority_baseline"] < 1
    classifier = open(os.path.join(study, "cells", "3ml", "classifier", "config.gin")).read()
    assert "NUM_CLASSES = 2" in classifier
    for ext in ("md", "json", "csv", "png"):
        assert os.path.getsize(os.path.join(study, f"mlm_efficiency.{ext}")) > 0


def test_the_compare_evaluation_masks_at_the_common_rate(study):
    mlm = os.path.join(study, "cells", "3ml", "mlm", "eval")
    own = json.load(open(os.path.join(mlm, "masked_lm.json")))["rows"][0]
    compare = json.load(open(os.path.join(mlm, "compare.json")))["rows"][0]
    tokens = own["windows"] * own["length"]
    assert own["masked_tokens"] == pytest.approx(0.5 * tokens, rel=0.1)
    assert compare["masked_tokens"] == pytest.approx(0.15 * tokens, rel=0.25)
