"""``torch.export`` programs (``.pt2``, dynamic batch dimension) of a model with its
detectors: every detector's own ``score`` is traced."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_ood.version import __version__
from lightning_ood.io import atomic_write
from lightning_ood.detectors import Detector, ForwardOutputs, detector_classes, reads_block_norms
from lightning_ood.detectors.functional import finite_inputs_checked
from lightning_ood.deploy.format import FORMAT, FORMAT_VERSION, PROGRAM_METADATA, PathLike, first_line
from lightning_ood.deploy.load import load
from lightning_ood.deploy.model import OODModel, preprocessing_from_datamodule
from lightning_ood.deploy.save import attached_datamodule


class _NotExportable(Exception):
    """A detector that cannot be exported, with the reason."""


def _check_exportable(detector: Detector) -> None:
    """The checks ``Detector.forward`` makes eagerly, made before tracing (a buffer's
    value cannot be read inside the trace)."""
    if not bool(detector.fitted):
        raise _NotExportable(f"{type(detector).__name__} is not fitted")


class _ExportModule(nn.Module):
    """What the ``.pt2`` program computes: ``OODModel.forward`` for the selected detectors."""

    def __init__(self, classifier: nn.Module, names: Sequence[str], needs_block_norms: bool,
                 thresholds: dict[str, float]) -> None:
        super().__init__()
        self.classifier = classifier
        self.names = list(names)
        self.needs_block_norms = needs_block_norms
        self.thresholds = {n: t for n, t in thresholds.items() if n in self.names}

    def forward(self, x: Tensor) -> dict[str, Any]:
        outputs = self.classifier.forward_outputs(x, with_block_norms=self.needs_block_norms).check_finite()
        with finite_inputs_checked():  # one assertion for the bundle, not one per detector
            scores = {name: self.classifier.detectors[name](outputs) for name in self.names}
        result: dict[str, Any] = {"logits": outputs.logits, "scores": scores}
        if self.thresholds:
            result["is_ood"] = {name: scores[name] < t for name, t in self.thresholds.items()}
        return result


class ScoreProbe(nn.Module):
    """One detector's score alone as a module taking (logits, features[, block_norms]): what
    export_program probes to find out whether (and why not) a detector exports, and what tests
    export."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, logits: Tensor, features: Tensor, block_norms: Optional[Tensor] = None) -> Tensor:
        return self.detector(ForwardOutputs(logits, features, block_norms))


def _as_model(module_or_path: Union[PathLike, nn.Module]) -> OODModel:
    if isinstance(module_or_path, OODModel):
        return module_or_path
    if isinstance(module_or_path, nn.Module) and hasattr(module_or_path, "forward_outputs"):
        datamodule = attached_datamodule(module_or_path)
        spec = preprocessing_from_datamodule(datamodule) if datamodule is not None else None
        return OODModel(module_or_path, preprocessing=spec)
    if isinstance(module_or_path, (str, os.PathLike)):
        return load(module_or_path)
    raise TypeError("export_program needs a model file path, an OODModel, or a network with detectors (OODClassifier, "
                    "PostHocClassifier, Classifier); "
                    f"got {type(module_or_path).__name__}")


def export_program(
    module_or_path: Union[PathLike, nn.Module],
    out_path: PathLike,
    example_batch: int = 2,
    image_size: Optional[int] = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Export the model and its detectors with ``torch.export`` (dynamic batch size).

    The program takes a normalised float32 batch (B, 3, H, W) — any B >= 1, H and W fixed —
    and returns the same dict as :meth:`OODModel.forward`. Detectors that cannot be
    exported are left out (reported in the returned dict and printed); the others are
    exported. Load it with ``torch.export.load(path).module()`` or :func:`load_program`,
    which also returns the preprocessing and thresholds stored in the file.

    Args:
        module_or_path: a model file, an :class:`OODModel`, an ``OODClassifier`` or a
            ``PostHocClassifier`` (a user's network with its fitted detectors).
        out_path: the ``.pt2`` file to write (atomically).
        example_batch: batch size of the example input used for tracing (>= 2, so the
            batch dimension stays symbolic).
        image_size: input height/width; default: the stored preprocessing's crop size.
        verbose: print which detectors were exported and which were not (and why).

    Returns:
        ``{"path", "exported": [names], "not_exported": {name: reason}, "input_shape",
        "max_abs_diff": {"logits"/name: float}}`` — the last compares the program with the
        eager model on the example input.
    """
    if int(example_batch) < 2:
        raise ValueError(f"example_batch must be >= 2 (a batch of 1 would be specialised); got {example_batch}")
    model = _as_model(module_or_path)
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval().requires_grad_(False)  # an inference program: no autograd bookkeeping
    try:
        size = image_size or (model.preprocessing or {}).get("crop_size")
        if size is None:
            raise ValueError("the input size is unknown (no preprocessing stored): pass image_size=")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(int(example_batch), 3, height, width, generator=generator).to(device)

        candidates: list[str] = []
        not_exported: dict[str, str] = {}
        for name, detector in model.detectors.items():
            try:
                _check_exportable(detector)
                candidates.append(name)
            except _NotExportable as err:
                not_exported[name] = str(err)
        program, scores = _export_with_fallback(model, candidates, example, not_exported)

        with torch.no_grad():
            reference = model.forward_outputs(example)
            got = program.module()(example)
            diffs = {"logits": float((got["logits"] - reference.logits).abs().max())}
            scale = {"logits": float(reference.logits.abs().max())}
            for name in scores:
                expected = model.detectors[name](reference)
                diffs[name] = float((got["scores"][name] - expected).abs().max())
                scale[name] = float(expected.abs().max())
        drifted = [n for n, d in diffs.items() if not d <= 1e-4 * max(1.0, scale[n])]
        if drifted:  # the traced score disagrees with the eager one: a bug, say it loudly
            warnings.warn(f"the exported program differs from the eager model for {drifted} "
                          f"(max abs differences {[diffs[n] for n in drifted]}); please report this")
        metadata = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "lightning_ood_version": __version__,
            "input": "normalised float32 (B, 3, H, W)", "input_shape": [None, 3, height, width],
            "num_classes": model.num_classes, "detectors": list(scores), "not_exported": not_exported,
            "thresholds": {n: t for n, t in model.thresholds.items() if n in scores},
            "preprocessing": model.preprocessing,
        }
        out_path = os.fspath(out_path)
        atomic_write(out_path, lambda f: torch.export.save(
            program, f, extra_files={PROGRAM_METADATA: json.dumps(metadata)}))
    finally:
        for module, training in modes:  # restore every submodule's own mode
            module.training = training
        for parameter, requires_grad in grads:
            parameter.requires_grad_(requires_grad)
    result = {"path": out_path, "exported": list(scores), "not_exported": not_exported,
              "input_shape": [None, 3, height, width], "max_abs_diff": diffs}
    if verbose:
        print(f"lightning_ood.deploy: wrote {out_path} (batch dimension dynamic, input (B, 3, {height}, {width}))")
        print(f"  exported detectors: {', '.join(scores) or 'none'}")
        for name, reason in not_exported.items():
            print(f"  NOT exported: {name}: {reason}")
    return result


def _export_with_fallback(model: OODModel, names: list[str], example: Tensor,
                          not_exported: dict[str, str]) -> tuple[Any, list[str]]:
    """Export the network with every detector's score. Detectors of other classes than
    :mod:`lightning_ood.detectors`' are probed alone first (dropped, with the reason, when
    they do not trace); if the whole export still fails, every detector is probed and the
    rest exported."""
    from torch.export import Dim, export

    with torch.no_grad():
        outputs = model.classifier.forward_outputs(example, with_block_norms=True)

    def exports_alone(name: str) -> bool:
        batch = Dim("batch", min=1)
        try:
            with _quiet_failures():
                export(ScoreProbe(model.detectors[name]),
                       (outputs.logits, outputs.features, outputs.block_norms),
                       dynamic_shapes=({0: batch}, {0: batch}, None if outputs.block_norms is None else {0: batch}),
                       strict=False)
            return True
        except Exception as err:
            not_exported[name] = f"does not trace with torch.export ({first_line(err)})"
            return False

    def run(selected: list[str]) -> Any:
        needs = reads_block_norms(model.detectors[n] for n in selected)
        module = _ExportModule(model.classifier, selected, needs, model.thresholds)
        with _quiet_failures():
            return export(module, (example,), dynamic_shapes=({0: Dim("batch", min=1)},), strict=False)

    builtin = set(detector_classes().values())
    selected = [n for n in names if type(model.detectors[n]) in builtin or exports_alone(n)]
    try:
        return run(selected), selected
    except Exception as first_error:
        if not selected:
            raise RuntimeError(f"the network itself does not export: {first_line(first_error)}") from first_error
    selected = [n for n in selected if exports_alone(n)]
    try:
        return run(selected), selected
    except Exception as err:
        if not_exported:
            raise RuntimeError(f"export failed even without the detectors {sorted(not_exported)}: {first_line(err)}") from err
        raise RuntimeError(f"the network itself does not export (every detector does on its own): {first_line(err)}") from err


@contextlib.contextmanager
def _quiet_failures() -> Iterator[None]:
    """Hold back what is printed to stderr (torch.export prints the partial graph of a
    failed trace); replay it only when the block succeeds: failures are reported briefly."""
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        yield
    sys.stderr.write(captured.getvalue())


def load_program(path: PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Load a ``.pt2`` written by :func:`export_program`: ``(module, metadata)``, where
    ``module(x)`` gives ``{"logits", "scores", "is_ood"}`` and ``metadata`` holds the
    preprocessing, thresholds and the detectors that were (not) exported."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exported program not found: {path}")
    extra = {PROGRAM_METADATA: ""}
    program = torch.export.load(path, extra_files=extra)
    return program.module(), json.loads(extra[PROGRAM_METADATA] or "{}")
