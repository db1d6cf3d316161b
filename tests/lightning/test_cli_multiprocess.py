"""The shipped quickstart config on 2 CPU processes (Gloo), exactly as it ships except for
its size (1 epoch) and the device flags: W&B logger (offline), plots, model file, tuning.

``ddp_spawn`` runs in this process; ``ddp`` (the README's recommendation) re-executes the
command line per rank, so it runs through ``train.py`` / ``evaluate.py`` subprocesses. Each
2-process results.json must equal a 1-process evaluation of the same checkpoint; every
file is written once, by rank 0, into one W&B run. A hang fails within minutes.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
from typing import Any, Iterator

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
SIZE = ["--trainer.max_epochs", "1"]  # the only change to the config: its length
CPU = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
TWO = ["--trainer.devices", "2"]
COMMAND_TIMEOUT = 300  # seconds; one command takes < 40 s on 2 idle cores


def _leaves(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{path}/{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path, tree


def assert_same_results(one: dict, many: dict) -> None:
    """Every value of results.json (metrics, thresholds, tuning grids and choices, sample
    counts, fitted statistics) equal within 1e-6; only ``devices`` and the wall times differ."""
    assert (one["devices"], many["devices"]) == (1, 2)
    a = dict(_leaves({k: v for k, v in one.items() if k not in ("devices", "timing")}))
    b = dict(_leaves({k: v for k, v in many.items() if k not in ("devices", "timing")}))
    assert set(a) == set(b), set(a) ^ set(b)
    for key, value in a.items():
        if isinstance(value, float) or isinstance(b[key], float):
            assert b[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert b[key] == value, key


def _run_folder(root: str, before: set[str]) -> str:
    new = sorted(set(glob.glob(os.path.join(root, "runs", "lightning_ood", "*"))) - before)
    assert len(new) == 1, f"expected one new run folder, got {new}"
    return new[0]


def _run_folders(root: str) -> set[str]:
    return set(glob.glob(os.path.join(root, "runs", "lightning_ood", "*")))


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def check_run_files(folder: str) -> dict:
    """The files of one run, written once: results.json/csv, config.yaml, one plot
    per reported detector, the model file, and exactly one W&B run for the folder."""
    results = _read(os.path.join(folder, "results.json"))
    assert results["id"]["n"] > 0 and results["metrics"]
    for name in ("results.csv", "model_with_detectors.ckpt", "config.yaml"):
        assert os.path.isfile(os.path.join(folder, name)), name
    plots = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "plots", "*.png")))
    assert plots == sorted(f"{d}.png" for d in results["metrics"])
    run_id = os.path.basename(folder)
    wandb_runs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(folder)), "wandb", f"offline-run-*-{run_id}"))
    assert len(wandb_runs) == 1, wandb_runs
    leftovers = glob.glob(os.path.join(folder, ".*.tmp"))
    assert not leftovers, leftovers
    import lightning_ood
    import torch

    model = lightning_ood.load(os.path.join(folder, "model_with_detectors.ckpt"))
    out = model(torch.zeros(2, 3, 32, 32))
    assert set(out["scores"]) == set(results["metrics"])
    return results


def _offline_wandb_runs(root: str) -> list[str]:
    return glob.glob(os.path.join(root, "runs", "wandb", "offline-run-*"))


# ------------------------------------------------------------------ ddp_spawn in-process
@pytest.mark.timeout(420)
def test_quickstart_fit_and_evaluate_with_ddp_spawn(tmp_path, monkeypatch):
    import wandb

    from lightning_ood.lightning.cli import evaluate_main, main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = str(tmp_path)
    spawn = [*TWO, "--trainer.strategy", "ddp_spawn"]

    main(["fit", "--config", QUICKSTART, *SIZE, *CPU, *spawn])
    wandb.finish()  # a user's next command is a new process; here the run must be closed
    fit_folder = _run_folder(root, set())
    fit_results = check_run_files(fit_folder)
    # fit and the test stage that follows it are one W&B run, on 2 ranks
    assert len(_offline_wandb_runs(root)) == 1
    checkpoints = glob.glob(os.path.join(fit_folder, "checkpoints", "*.ckpt"))
    assert len(checkpoints) == 1, checkpoints

    before = _run_folders(root)
    evaluate_main(["--config", QUICKSTART, "--ckpt_path", checkpoints[0], *CPU, *spawn])
    wandb.finish()
    spawn_results = check_run_files(_run_folder(root, before))

    before = _run_folders(root)
    evaluate_main(["--config", QUICKSTART, "--ckpt_path", checkpoints[0], *CPU])
    wandb.finish()
    one = check_run_files(_run_folder(root, before))

    assert len(_offline_wandb_runs(root)) == 3  # fit + 2 evaluations: one run each, not one per rank
    assert_same_results(one, fit_results)
    assert_same_results(one, spawn_results)


# ------------------------------------------------------------------ ddp via the scripts
def run_script(args: list[str], cwd: str) -> str:
    """Run ``python <script> ...`` in its own process group; kill the whole group (every
    rank) and fail with the output if it runs past :data:`COMMAND_TIMEOUT`."""
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(args[:2])} hung for {COMMAND_TIMEOUT} s (a collective some rank never "
                    f"reached?); last output:\n{output[-3000:]}")
    assert process.returncode == 0, output[-5000:]
    return output


@pytest.mark.timeout(3 * COMMAND_TIMEOUT + 60)
def test_quickstart_fit_and_evaluate_with_ddp_scripts(tmp_path):
    root = str(tmp_path)
    ddp = [*TWO, "--trainer.strategy", "ddp"]
    output = run_script([os.path.join(REPO, "train.py"), "fit", "--config", QUICKSTART, *SIZE, *CPU, *ddp], root)
    assert output.count("results written to") == 1, output[-3000:]  # the report is rank 0's alone
    fit_folder = _run_folder(root, set())
    fit_results = check_run_files(fit_folder)
    assert len(_offline_wandb_runs(root)) == 1
    checkpoint = glob.glob(os.path.join(fit_folder, "checkpoints", "*.ckpt"))[0]

    before = _run_folders(root)
    output = run_script([os.path.join(REPO, "evaluate.py"), "--config", QUICKSTART, "--ckpt_path", checkpoint,
                         *CPU, *ddp], root)
    assert output.count("results written to") == 1, output[-3000:]
    ddp_results = check_run_files(_run_folder(root, before))

    before = _run_folders(root)
    run_script([os.path.join(REPO, "evaluate.py"), "--config", QUICKSTART, "--ckpt_path", checkpoint, *CPU], root)
    one = check_run_files(_run_folder(root, before))

    assert len(_offline_wandb_runs(root)) == 3
    assert_same_results(one, fit_results)
    assert_same_results(one, ddp_results)
