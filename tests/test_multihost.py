"""A multi-host run on this machine: two processes joined by `jax.distributed` (CPU collectives
over gloo), two CPU devices each, train one run directory on a 4-device `fsdp:2,tensor:2` mesh
(parameters sharded across the processes). Its losses equal a one-process run on 4 devices,
every step is logged once, process 0 alone writes the run's files, and a one-process `evaluate`
restores the checkpoint the two processes saved together.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

MESH = "fsdp:2,tensor:2"
STEPS = 4
RUN = ["--gin_file=configs/runs/quickstart.gin", "--gin.NUM_LAYERS=1", "--gin.EMBED_DIM=32",
       "--gin.NUM_HEADS=2", "--gin.MLP_DIM=64", "--gin.BATCH_SIZE=8", "--gin.TRAIN_LENGTH=32",
       f"--gin.TRAIN_STEPS={STEPS}", "--gin.CHECKPOINT_EVERY=2", "--gin.LOG_EVERY=1",
       "--gin.EVAL_EVERY=0", f"--gin.MESH='{MESH}'"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python(args: list[str], devices: int, cache: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", LEXJAX_DATA_CACHE=cache,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def losses(model_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process run, the two processes' outputs, and the two-process run directory."""
    root = tmp_path_factory.mktemp("multihost")
    cache = str(root / "cache")
    one, two = str(root / "one"), str(root / "two")
    port = free_port()
    distributed = ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
                   "--num_processes=2"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        single = pool.submit(python, ["-m", "lexjax.train", *RUN, f"--model_dir={one}"], 4,
                             cache)
        processes = [pool.submit(python, ["-m", "lexjax.train", *RUN, f"--model_dir={two}",
                                          *distributed, f"--process_id={i}"], 2, cache)
                     for i in range(2)]
        results = single.result(), [p.result() for p in processes]
    return {"single": results[0], "processes": results[1], "one": one, "two": two,
            "cache": cache}


def test_both_processes_finish(runs):
    assert runs["single"].returncode == 0, runs["single"].stderr[-3000:]
    for process in runs["processes"]:
        assert process.returncode == 0, process.stderr[-3000:]


def test_losses_equal_one_process_and_each_step_is_logged_once(runs):
    two, one = dict(losses(runs["two"])), dict(losses(runs["one"]))
    assert [step for step, _ in losses(runs["two"])] == list(range(1, STEPS + 1))
    assert [two[step] for step in one] == pytest.approx(list(one.values()), abs=1e-5)


def test_process_zero_alone_reports(runs):
    first, second = (p.stderr for p in runs["processes"])
    assert "trained steps 1-4" in first
    assert "trained steps" not in second and "step 1/4" not in second
    events = os.listdir(os.path.join(runs["two"], "tensorboard"))
    assert len(events) == 1, events
    assert os.path.exists(os.path.join(runs["two"], "config.gin"))


def test_one_process_evaluates_the_checkpoint_two_processes_saved(runs):
    evaluated = python(["-m", "lexjax.evaluate", f"--model_dir={runs['two']}", "--lengths=32",
                        "--max_tokens=512"], 1, runs["cache"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    with open(os.path.join(runs["two"], "eval", "extrapolation.json")) as f:
        report = json.load(f)
    assert report["step"] == STEPS


def test_a_signal_to_one_host_stops_both_after_the_same_step(tmp_path):
    """SIGTERM to process 1 alone: both processes stop after the same step (exit 143, the same
    step named) and save that step's checkpoint, the only one (before the fix, process 0 went
    on alone and waited forever in the next step's collectives)."""
    model_dir, cache, port = str(tmp_path / "run"), str(tmp_path / "cache"), free_port()
    long_run = [a for a in RUN if not a.startswith(("--gin.TRAIN_STEPS", "--gin.CHECKPOINT"))]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", LEXJAX_DATA_CACHE=cache,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    processes = [subprocess.Popen(
        [sys.executable, "-m", "lexjax.train", *long_run, "--gin.TRAIN_STEPS=100000",
         "--gin.CHECKPOINT_EVERY=100000", f"--model_dir={model_dir}", "--distributed",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
        metrics = os.path.join(model_dir, "metrics.jsonl")
        deadline = time.time() + 300
        while not (os.path.exists(metrics) and len(losses(model_dir)) >= 3):
            assert time.time() < deadline and processes[0].poll() is None, "no training steps"
            time.sleep(0.5)
        processes[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=300)[1] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [143, 143], outputs
    steps = [re.search(r"stopped by SIGTERM at step (\d+)", out) for out in outputs]
    assert all(steps), outputs
    assert steps[0].group(1) == steps[1].group(1)
    saved = sorted(int(name) for name in os.listdir(os.path.join(model_dir, "checkpoints"))
                   if name.isdigit())
    assert saved == [int(steps[0].group(1))]
