"""Stopping `python -m lexjax.train` with SIGTERM (a preemption) and SIGINT (Ctrl-C), and running
it with output redirected: each signal ends the run after the current step with a checkpoint of
it, a one-line message, no traceback and the conventional exit status (143, 130); progress reaches
a redirected stderr line by line, with no native start-up noise. The trainers run as
subprocesses, concurrently, from a module fixture. In-process: a second signal stops at once."""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import write_corpus

TINY = ["--gin.NUM_LAYERS=1", "--gin.EMBED_DIM=32", "--gin.NUM_HEADS=2", "--gin.MLP_DIM=64",
        "--gin.BATCH_SIZE=2", "--gin.TRAIN_LENGTH=16", "--gin.LOG_EVERY=1", "--gin.EVAL_EVERY=0",
        "--gin_file=configs/data/text_files.gin",
        "--gin.MIXTURE_OR_TASK_NAME=lexjax.text_files"]


def logged_steps(model_dir: str) -> list[int]:
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    steps = []
    for line in open(path):
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return steps


def checkpoint_steps(model_dir: str) -> list[int]:
    directory = os.path.join(model_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) \
        if os.path.isdir(directory) else []


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupts")
    glob = write_corpus(str(root / "corpus"))
    env = dict(os.environ, LEXJAX_DATA_CACHE=str(root / "cache"))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)

    def trainer(name, steps, *extra):
        model_dir = str(root / name)
        command = [sys.executable, "-m", "lexjax.train", "--gin_file=configs/runs/quickstart.gin",
                   *TINY, f"--gin.TEXT_FILES_GLOB={glob}", f"--gin.TRAIN_STEPS={steps}",
                   f"--gin.CHECKPOINT_EVERY={steps}", *extra, f"--model_dir={model_dir}"]
        return model_dir, subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)

    def stop_after(name, signals, at_step=5):
        model_dir, process = trainer(name, 100000)
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if max(logged_steps(model_dir), default=0) >= at_step:
                break
            time.sleep(0.2)
        reached = max(logged_steps(model_dir), default=0)
        for sig in signals:
            process.send_signal(sig)
        out, err = process.communicate(timeout=240)
        return dict(reached=reached, returncode=process.returncode, stdout=out, stderr=err,
                    checkpoints=checkpoint_steps(model_dir), logged=logged_steps(model_dir))

    def finishes():
        model_dir, process = trainer("redirected", 6)
        out, err = process.communicate(timeout=300)
        return dict(returncode=process.returncode, stdout=out, stderr=err)

    jobs = {"SIGTERM": lambda: stop_after("term", [signal.SIGTERM]),
            "SIGINT": lambda: stop_after("int", [signal.SIGINT]),
            "redirected": finishes}
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_saves_the_step_reached_and_exits_cleanly(stopped, name, code):
    result = stopped[name]
    assert result["returncode"] == code, result["stderr"][-2000:]
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    assert result["checkpoints"] and result["checkpoints"][-1] >= result["reached"] >= 5
    assert result["checkpoints"][-1] == result["logged"][-1]  # the last step run is saved
    stop_line = [line for line in result["stderr"].splitlines() if line.startswith("stopped by")]
    assert len(stop_line) == 1 and name in stop_line[0], result["stderr"][-2000:]


def test_redirected_output_shows_progress_lines_and_no_start_up_noise(stopped):
    result = stopped["redirected"]
    assert result["returncode"] == 0, result["stderr"][-2000:]
    lines = result["stderr"].splitlines()
    progress = [line for line in lines if line.startswith("step ") and "loss" in line]
    assert [line.split(":")[0] for line in progress] == [f"step {i}/6" for i in range(1, 7)]
    assert lines[-1].startswith("trained steps 1-6 of 6"), lines[-1]
    for noise in ("InitializeLog", "cudart_stub", "oneDNN", "cuInit"):
        assert noise not in result["stderr"], noise


def test_the_first_signal_is_recorded_and_the_second_stops_at_once():
    from lexjax.training.interrupts import StopRequests
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stop.requested == stop.agreed() == signal.SIGINT  # one process: its own
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
    assert {sig: signal.getsignal(sig) for sig in before} == before  # restored
