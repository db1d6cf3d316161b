"""Every benchmark script runs in --tiny mode and prints its markdown table(s).

The scripts are started together as subprocesses (one module-scoped fixture), so the
suite pays for the slowest one rather than for the sum of their start-ups. --tiny never
writes BENCHMARKS.md. The --tiny runs of train_speed and eval_speed also smoke-test their
GPU code paths (DataLoader vs device_loader; synthetic CIFAR-size evaluation) on the CPU.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TIMEOUT_S = 600

#: script id -> (command-line arguments, header cells every printed table must show, row labels)
CASES = {
    "quality_digits": (
        ["quality_digits.py", "--tiny"],
        [["loss", "detector", "near AUROC %", "near FPR95 %", "far AUROC %", "far FPR95 %",
          "Δ AUROC vs MSP near / far", "beats MSP? near / far"],
         ["loss", "ID accuracy %"]],
        ["| ce | msp |", "| ce | max_logit |", "| ce | energy |", "| ce | ash_p |", "| ce | ash_b |",
         "| ce | ash_s |", "| ce | weiper |", "| ce | feature_norm |", "| isomax_plus | min_distance (native) |",
         "| l2_norm | penultimate_norm (native) |"],
    ),
    "train_speed": (
        ["train_speed.py", "--tiny"],
        [["objective", "median step ms (wall / CPU)", "ratio vs ce (wall / CPU)", "target",
          "meets target? (wall / CPU)", "ratio implied by head + loss"],
         ["loop", "median step ms (wall / CPU)", "ratio vs plain (wall / CPU)", "target"],
         ["training path", "precision", "channels_last / compile", "images/s", "speed-up"]],  # --loaders path
        ["| ce |", "| isomax_plus |", "| l2_norm |", "| plain PyTorch loop |", "| Trainer.fit |",
         "| DataLoader |", "| device_loader |"],
    ),
    "eval_speed": (
        ["eval_speed.py", "--tiny"],
        [["model", "images", "plain test pass s", "test pass with every detector s", "ratio", "target",
          "meets target?", "fitting pass s (separate)"],
         ["detector", "score ms / 1000 images"],
         ["detector", "fit samples/s (N)", "score samples/s (B)", "fit peak MB (N small / large)",
          "fitted state bytes (N small / large)"]],
        ["| ResNet18 width 4 (digits) |", "| ResNet18 width 4 (synthetic) |",  # the latter: the --gpu path
         "| weiper |", "| feature_norm |", "| WeiPer (", "| FeatureNorm ("],
    ),
    "ddp_scaling": (
        ["ddp_scaling.py", "--tiny"],
        [["processes", "launch", "torch threads / process", "trainer.test() wall s (incl. start-up)",
          "max abs metric diff vs 1 process"]],
        ["\n| 1 | in-process | ", "\n| 2 | ddp_spawn | "],
    ),
    "weiper_throughput": (["weiper_throughput.py", "--tiny"], [], []),
    "tuning_cost": (["tuning_cost.py", "--tiny"], [["detectors", "grid points scored", "seconds"]],
                    ["| ASH-P/B/S | 39 |", "| WeiPer | 2 |"]),
    "checkpoint_size": (["checkpoint_size.py", "--tiny"], [["file", "size (MB)", "save (s)", "load (s)"]],
                        ["identical to the saved model's in both files: True", "| compact (default) |",
                         "| compact=False |"]),
}
# any other script in benchmarks/ must at least run --tiny and print a table
for _script in sorted(BENCH.glob("*.py")):
    if not _script.name.startswith("_") and not any(args[0] == _script.name for args, _, _ in CASES.values()):
        CASES[_script.stem] = ([_script.name, "--tiny"], [], [])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every script at once; wait for all of them."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out_dir = tmp_path_factory.mktemp("benchmarks")
    before = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    started = time.perf_counter()
    procs = {}
    for name, (args, _, _) in CASES.items():
        log = open(out_dir / f"{name}.log", "w")
        procs[name] = (subprocess.Popen([sys.executable, str(BENCH / args[0]), *args[1:]], cwd=out_dir, env=env,
                                        stdout=log, stderr=subprocess.STDOUT, text=True), log)
    results = {}
    for name, (proc, log) in procs.items():
        remaining = max(1.0, TIMEOUT_S - (time.perf_counter() - started))
        try:
            code = proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        log.close()
        results[name] = (code, (out_dir / f"{name}.log").read_text())
    after = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    results["_benchmarks_md_unchanged"] = before == after
    results["_wall_s"] = time.perf_counter() - started
    return results


def _header_rows(output: str) -> list[list[str]]:
    """The header cells of every markdown table in ``output``."""
    lines = output.splitlines()
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line, below in zip(lines, lines[1:]) if line.startswith("|") and below.startswith("|---")]


@pytest.mark.parametrize("name", list(CASES))
def test_tiny_run_succeeds_and_prints_its_table(runs, name):
    code, output = runs[name]
    assert code == 0, f"{name} --tiny exited with {code}:\n{output[-4000:]}"
    headers = _header_rows(output)
    assert headers, f"{name} printed no markdown table:\n{output[-2000:]}"
    _, expected_headers, expected_rows = CASES[name]
    for expected in expected_headers:
        assert any(all(cell in header for cell in expected) for header in headers), \
            f"{name}: no table with columns {expected}; tables printed: {headers}"
    for row in expected_rows:
        assert row in output, f"{name}: row {row!r} missing:\n{output[-3000:]}"


def test_ddp_tiny_metrics_are_identical(runs):
    code, output = runs["ddp_scaling"]
    assert code == 0
    line = next(line for line in output.splitlines() if line.startswith("max abs difference"))
    assert float(line.rsplit(":", 1)[1]) < 1e-6, line


def test_tiny_runs_leave_benchmarks_md_alone(runs):
    assert runs["_benchmarks_md_unchanged"]
