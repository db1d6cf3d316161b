"""Reading a model file: :func:`load` rebuilds an :class:`~lightning_ood.deploy.model.OODModel`
(plain torch, no Lightning needed) and names the problem and the fix for every file it
cannot read."""
from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lightning_ood.version import __version__
from lightning_ood.detectors import Detector, detector_classes
from lightning_ood.deploy.format import CHECKPOINT_NAME, CheckpointError, FORMAT, FORMAT_VERSION, PathLike, sha256_of
from lightning_ood.deploy.model import OODModel
from lightning_ood.nn.classifier import Classifier


_HOW_TO_MAKE = (
    "Make one with lightning_ood.deploy.save_with_detectors(model, path) from an OODClassifier "
    "whose detectors are attached and fitted, or run trainer.test with the OODEvaluation callback "
    f"(it writes {CHECKPOINT_NAME} next to its report)."
)


def load(path: PathLike, map_location: Optional[Union[str, torch.device]] = None) -> OODModel:
    """Load a model file written by :func:`save_with_detectors` (or ``OODEvaluation``).

    Args:
        path: the ``.ckpt`` file.
        map_location: device to put the model on (``None``: CPU).

    Returns:
        An :class:`OODModel` for inference: eval mode, parameters frozen
        (``model.requires_grad_(True)`` to fine-tune); ``model(x)`` gives logits, scores
        and ``is_ood``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: truncated or corrupted file, a file that is not a lightning_ood
            model file (a plain ``state_dict``, a Lightning training checkpoint ...), a
            ``format_version`` newer than this lightning_ood reads, or weights that do not
            fit the recorded model configuration.
    """
    checkpoint = _read(os.fspath(path))
    model = _build(checkpoint, os.fspath(path))
    if map_location is not None:
        model.to(map_location)
    return model.eval().requires_grad_(False)


def _read(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; pass the model file inside it (e.g. {CHECKPOINT_NAME})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", str(err), re.IGNORECASE)
        if blocked and zipfile.is_zipfile(path):  # a plain pickle of objects: named by _corrupted
            raise CheckpointError(
                f"{path} holds pickled Python objects ({_sniff_pickled(path)}; it references {blocked.group(1)}, "
                "which was not loaded or run), not a lightning_ood model file, which holds only tensors and "
                f"plain values. {_HOW_TO_MAKE}"
            ) from None
        raise CheckpointError(_corrupted(path, err)) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as err:
        raise CheckpointError(_corrupted(path, err)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a lightning_ood model file. {_HOW_TO_MAKE}"
        )
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is {_describe_foreign(obj)}, not a lightning_ood model file. {_HOW_TO_MAKE}")
    version = obj.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has an invalid format_version {version!r}; the file is damaged")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer lightning_ood (file format_version {version}, written by "
            f"lightning_ood {obj.get('lightning_ood_version', '?')}); this lightning_ood {__version__} reads "
            f"format_version <= {FORMAT_VERSION}. Upgrade lightning_ood: pip install -U lightning_ood"
        )
    missing = [k for k in ("model", "detectors", "state_dict") if k not in obj]
    if missing:
        raise CheckpointError(f"{path} lacks the entries {missing}; the file is damaged. {_HOW_TO_MAKE}")
    return obj


def _corrupted(path: str, err: BaseException) -> str:
    """What an unreadable file is, from its bytes (never unpickled): a torch.export program,
    a zip or pickle that is not a model file, or a damaged PyTorch file."""
    size = os.path.getsize(path)
    again = "Copy the file again or re-create it (save_with_detectors, or trainer.test with OODEvaluation)."
    if size == 0:
        return f"{path} (0 bytes) is empty. {again}"
    if is_program(path):
        return (f"{path} is a torch.export program (.pt2), not a lightning_ood model file: load it with "
                "lightning_ood.deploy.load_program(path) (or torch.export.load(path).module())")
    names = _zip_names(path)
    if names is not None and not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        shown = ", ".join(repr(n[:60]) for n in names[:3]) + (" ..." if len(names) > 3 else "")
        return (f"{path} ({size} bytes) is not a model file: a zip archive, but not a PyTorch file (it holds "
                f"{shown or 'nothing'}). {_HOW_TO_MAKE}")
    with open(path, "rb") as file:
        starts_like_a_zip = file.read(4) == b"PK\x03\x04"
    pickled, references = (None, []) if names is not None or starts_like_a_zip else _pickle_kind(path)
    if pickled == "pickle":
        held = (f" of Python objects (it references {', '.join(references[:3])}"
                f"{' ...' if len(references) > 3 else ''})" if references else "")
        return (f"{path} is a plain Python pickle{held}; nothing in it was loaded or run. It is not a lightning_ood "
                f"model file, which is a PyTorch zip archive of tensors and plain values. {_HOW_TO_MAKE}")
    if names is not None or starts_like_a_zip:
        kind = "truncated or corrupted: a PyTorch zip archive that cannot be read"
    elif pickled == "legacy":
        kind = "truncated or corrupted: a PyTorch file of the legacy (before torch 1.6) format that cannot be read"
    else:
        kind = "not a model file: its bytes are neither a PyTorch zip archive nor a pickle (or it is cut short)"
    return f"{path} ({size} bytes) is {kind} ({_torch_detail(err)}). {again}"


def _torch_detail(err: BaseException) -> str:
    """torch's reason without its boilerplate: never its advice to load with
    ``weights_only=False``, which would run whatever code the file holds."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line.lower() and "weightsunpickler" not in line.lower()
              and not line.lower().startswith(("check the documentation", "please file an issue"))]
    if not useful:
        return type(err).__name__
    reason = re.split(r"\s*(?:\(Could this error message be improved|This is an internal miniz error)", useful[0])[0]
    return f"{type(err).__name__}: {reason[:200]}" if reason else type(err).__name__


def is_program(path: str) -> bool:
    """Whether ``path`` is a zip archive laid out as a ``torch.export`` program (``.pt2``)."""
    names = _zip_names(path)
    return names is not None and any(name.endswith("/models/model.json") for name in names)


def _zip_names(path: str) -> Optional[list[str]]:
    """The member names of a readable zip archive; ``None`` for anything else."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


#: ``torch.save``'s legacy (non-zip) files start with a pickle of this number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


#: How much of a file :func:`_pickle_kind` parses.
_PICKLE_PROBE = 1 << 20


def _pickle_kind(path: str) -> tuple[Optional[str], list[str]]:
    """``("legacy", [])`` for a legacy ``torch.save`` file, ``("pickle", globals it references)``
    for any other pickle (any protocol), ``(None, [])`` otherwise. Parses the opcodes of the
    file's first MiB with :mod:`pickletools`, which neither imports nor runs anything."""
    import pickletools

    with open(path, "rb") as file:
        data = file.read(_PICKLE_PROBE)
    opcodes, strings, references = 0, [], []
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
            opcodes += 1
            if isinstance(arg, int) and not isinstance(arg, bool) and arg == _LEGACY_MAGIC:
                return "legacy", []
            if opcode.name == "GLOBAL" and isinstance(arg, str):
                references.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                references.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
            if opcode.name == "STOP":
                return "pickle", list(dict.fromkeys(references))
    except Exception:  # any parse failure: not a pickle (or the probe ended inside a large one)
        pass
    larger = len(data) == _PICKLE_PROBE and os.path.getsize(path) > _PICKLE_PROBE
    starts_with_proto = len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5
    return ("pickle", list(dict.fromkeys(references))) if larger and starts_with_proto and opcodes > 1 else (None, [])


def _sniff_pickled(path: str) -> str:
    """What a file of pickled objects seems to be, from the bytes of its pickle (never run)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            data = archive.read(name) if name else b""
    except (zipfile.BadZipFile, OSError, KeyError):
        data = b""
    if b"pytorch-lightning_version" in data:
        return ("a PyTorch Lightning training checkpoint; restore it with OODClassifier.load_from_checkpoint(path), "
                "then save it with its detectors")
    if b"torch.nn.modules" in data or b"lightning_ood" in data:
        return "a pickled torch.nn.Module; save its state_dict and config instead"
    return "objects other than tensors and plain values"


def _describe_foreign(obj: dict[str, Any]) -> str:
    if "pytorch-lightning_version" in obj or ("state_dict" in obj and "global_step" in obj):
        return (
            f"a PyTorch Lightning training checkpoint (Lightning {obj.get('pytorch-lightning_version', '?')}, "
            f"epoch {obj.get('epoch', '?')}, global step {obj.get('global_step', '?')}): it holds the weights "
            "but not the fitted detectors' configuration. Restore it with "
            "OODClassifier.load_from_checkpoint(path), then run trainer.test with OODEvaluation or call "
            "save_with_detectors after attaching and fitting detectors"
        )
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        first = next(iter(obj))
        return (
            f"a plain state_dict ({len(obj)} tensors, e.g. {first!r}): it has weights but no model "
            "configuration and no detector configuration"
        )
    if "format" in obj:
        return f"a file of format {obj['format']!r}"
    return f"a dict with keys {sorted(map(str, obj))[:8]}"


#: OODClassifier arguments that version-1/2 files may record and a served network ignores.
TRAINING_ONLY_ARGUMENTS = ("entropic_scale", "lr", "momentum", "nesterov", "weight_decay", "scheduler", "milestones",
                           "gamma", "pretrained", "compile")


def _build(checkpoint: dict[str, Any], path: str) -> OODModel:
    model_cfg = checkpoint["model"]
    if not isinstance(model_cfg, dict) or model_cfg.get("class") != "OODClassifier":
        raise CheckpointError(f"{path}: unsupported model {model_cfg!r:.120}; this lightning_ood builds OODClassifier")
    hparams = dict(model_cfg.get("hparams") or {})
    network_args = {k: v for k, v in hparams.items() if k not in TRAINING_ONLY_ARGUMENTS}
    try:
        classifier = Classifier(**network_args)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the recorded model config {hparams} cannot be built: {err}") from None

    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' is not a mapping of names to tensors; the file is damaged")
    described = _config_summary(hparams)
    network = {k: v for k, v in classifier.state_dict().items() if k.split(".", 1)[0] in ("backbone", "head")}
    _check_fit(path, described, network, {k: v for k, v in state.items() if not k.startswith("detectors.")})
    for prefix in ("backbone", "head"):
        getattr(classifier, prefix).load_state_dict(
            {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}, strict=True)

    allowed = detector_classes()
    detectors: dict[str, Detector] = {}
    for cfg in checkpoint["detectors"]:
        if not isinstance(cfg, dict) or not {"name", "class", "init_args"} <= set(cfg):
            raise CheckpointError(f"{path}: damaged detector entry {cfg!r:.120}")
        name, cls_name = cfg["name"], cfg["class"]
        if cls_name not in allowed:
            raise CheckpointError(
                f"{path}: detector {name!r} has class {cls_name!r}, which this lightning_ood does not provide "
                f"(known: {', '.join(sorted(allowed))}); upgrade lightning_ood or re-save without it"
            )
        try:
            detector = allowed[cls_name](**cfg["init_args"])
            _fill_unallocated(detector, state, f"detectors.{name}.")
            detector.attach(classifier.head, classifier.backbone.num_blocks)  # re-draws what the file left out
        except (TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: detector {name!r} ({cls_name}) does not fit the model ({described}): {err}") from None
        _check_regenerated(path, checkpoint, name, detector, cfg.get("regenerated") or {}, state)
        detectors[name] = detector
    classifier.detectors.update(detectors)
    expected = {k: v for k, v in classifier.state_dict().items() if k.split(".", 1)[0] in ("backbone", "head", "detectors")}
    _check_fit(path, described, expected, state)
    classifier.load_state_dict(state, strict=True)
    return OODModel(classifier, checkpoint.get("thresholds") or {}, checkpoint.get("preprocessing"))


def _check_regenerated(path: str, checkpoint: dict[str, Any], name: str, detector: Detector,
                       digests: Mapping[str, str], state: dict[str, Tensor]) -> None:
    """Compare the buffers ``attach`` re-drew with the digests recorded at save time and
    put them into ``state`` (so the strict load that follows sees every buffer)."""
    if not isinstance(digests, Mapping) or not all(isinstance(v, str) for v in digests.values()):
        raise CheckpointError(f"{path}: detector {name!r}: damaged 'regenerated' entry {digests!r:.120}")
    for buffer, digest in digests.items():
        key = f"detectors.{name}.{buffer}"
        tensor = getattr(detector, buffer, None)
        if key in state or not isinstance(tensor, Tensor):
            raise CheckpointError(f"{path}: detector {name!r}: damaged 'regenerated' entry for {buffer!r}")
        if sha256_of(tensor) == digest:
            state[key] = tensor
            continue
        written_with = checkpoint.get("torch_version", "?")
        if written_with == str(torch.__version__):
            raise CheckpointError(f"{path}: detector {name!r}: {buffer} re-drawn from the saved head and seed does "
                                  "not match its recorded digest, under the torch version that wrote the file: the "
                                  "file was edited or damaged")
        raise CheckpointError(
            f"{path}: detector {name!r}: {buffer} re-drawn from the saved head and seed differs from the one "
            f"the file was written with (torch {written_with}; this is torch {torch.__version__}, whose random "
            "generator may differ). Load the file with that torch version and re-save it with "
            "save_with_detectors(..., compact=False)."
        )


def _fill_unallocated(detector: Detector, state: dict[str, Tensor], prefix: str) -> None:
    """Give buffers that are still ``None`` (allocated lazily by ``attach``, e.g. WeiPer's
    perturbed projections) the file's tensors, so ``attach`` only checks their shapes
    instead of re-drawing them."""
    for name, buffer in list(detector._buffers.items()):
        if buffer is None and prefix + name in state:
            value = state[prefix + name].clone()
            # load builds a float32 model: its detectors keep float32 statistics whatever the
            # precision of the model the file came from
            detector._buffers[name] = value.float() if value.is_floating_point() else value


def _config_summary(hparams: Mapping[str, Any]) -> str:
    keys = ("backbone", "loss", "num_classes", "width", "cifar_stem")
    return ", ".join(f"{k}={hparams.get(k)!r}" for k in keys if k in hparams)


def _check_fit(path: str, described: str, expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: " + "; ".join(shapes[:6]) + (" ..." if len(shapes) > 6 else ""))
    if missing:
        parts.append(f"{len(missing)} missing keys: {missing[:6]}" + (" ..." if len(missing) > 6 else ""))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {unexpected[:6]}" + (" ..." if len(unexpected) > 6 else ""))
    raise CheckpointError(
        f"{path}: the weights do not fit the recorded architecture ({described}): " + "; ".join(parts)
        + ". The file was edited, assembled from different models, or written by a lightning_ood whose "
        "architecture differs; re-create it with save_with_detectors."
    )
