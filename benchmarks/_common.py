"""Shared helpers of the benchmark scripts: machine description, BENCHMARKS.md sections,
markdown tables, quiet Trainers, timing statistics."""
from __future__ import annotations

import datetime
import os
import shlex
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weiper_throughput import machine  # noqa: E402  (one definition of "machine" for every section)
from torch.utils.data import Subset  # noqa: E402

from lightning_ood.data import DigitsDataModule  # noqa: E402
from lightning_ood.data.base import IndexedDataset  # noqa: E402


def quiet() -> None:
    """Silence Lightning's and torch's informational chatter in benchmark output."""
    import logging

    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_MODE", "disabled")


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """A CPU Trainer without logger, checkpoints, progress bar or model summary."""
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    kwargs.update(overrides)
    return kwargs


def evaluation_callback(output_dir: str, **overrides: Any):
    """``OODEvaluation(output_dir=..., plots=False, **overrides)``; also turns off the
    evaluated-model checkpoint when this version of the callback has that option (benchmarks
    read ``.results``; writing a checkpoint per run would only cost time). ``tune=None``
    keeps the callback's default tuning mode."""
    import inspect

    from lightning_ood.lightning.callback import OODEvaluation

    kwargs: dict[str, Any] = dict(output_dir=output_dir, plots=False)
    accepted = inspect.signature(OODEvaluation.__init__).parameters
    if "save_checkpoint" in accepted:
        kwargs["save_checkpoint"] = False
    kwargs.update(overrides)
    if kwargs.get("tune") is None or "tune" not in accepted:  # None: the callback's default
        kwargs.pop("tune", None)
    return OODEvaluation(**kwargs)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    return float(statistics.fmean(values)), (float(statistics.stdev(values)) if len(values) > 1 else 0.0)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *(shlex.quote(a) for a in sys.argv[1:])])


def header_lines(runtime_s: float, extra: Optional[str] = None) -> list[str]:
    """Machine, torch version, date, exact command and runtime, as markdown bullets."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = [
        f"- machine: {machine()}; torch {torch.__version__}; {torch.get_num_threads()} torch threads; "
        f"date {datetime.date.today().isoformat()}",
        f"- command: `{command_line()}`",
        f"- runtime: {runtime_s:,.0f} s; load average at the end (1/5/15 min) "
        f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}",
    ]
    if extra:
        lines.append(extra)
    return lines


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the ``<!-- name:start -->`` ... ``<!-- name:end -->`` section of
    ``path``, leaving everything else in the file as it is."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text and text.index(start) < text.index(end):
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    print(f"\nwrote the {name} section of {path}")


def _truncate(dataset: Any, n: Optional[int]) -> Any:
    if n is None or len(dataset) <= n:
        return dataset
    keep = torch.linspace(0, len(dataset) - 1, n).round().long().unique().tolist()
    return IndexedDataset(Subset(dataset.dataset, keep), dataset.transform, dataset.ood)


class SmallerDigits(DigitsDataModule):
    """DigitsDataModule with its ID test set and OOD sets cut to ``max_test`` evenly spaced
    images each (benchmark smoke runs); identical to DigitsDataModule when ``max_test`` is None."""

    def __init__(self, max_test: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_test = max_test

    def setup(self, stage: Optional[str] = None) -> None:
        super().setup(stage)
        self.test_set = _truncate(self.test_set, self.max_test)
        self.ood_test_sets = {k: _truncate(v, self.max_test) for k, v in self.ood_test_sets.items()}


def tune_default() -> str:
    """The callback's default ``tune`` mode ("none" for versions without tuning)."""
    import inspect

    from lightning_ood.lightning.callback import OODEvaluation

    parameter = inspect.signature(OODEvaluation.__init__).parameters.get("tune")
    return "none" if parameter is None else str(parameter.default)
