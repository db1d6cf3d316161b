"""``python -m lightning_ood.deploy CKPT --out model.pt2``: export a model file to a
``torch.export`` program."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Optional


from lightning_ood.deploy.format import CHECKPOINT_NAME, CheckpointError
from lightning_ood.deploy.load import is_program, load
from lightning_ood.deploy.program import export_program


def _output_refusal(source: str, out: str, overwrite: bool) -> Optional[str]:
    """Why ``out`` must not be written (``None`` when it may): it is the input file itself,
    or an existing file that is not a torch.export program and ``--overwrite`` was not given."""
    same = os.path.abspath(os.path.realpath(source)) == os.path.abspath(os.path.realpath(out))
    if not same and os.path.exists(source) and os.path.exists(out):
        same = os.path.samefile(source, out)
    if same:
        return f"--out {out} is the input model file itself; choose another name (e.g. {os.path.splitext(out)[0]}.pt2)"
    if os.path.isdir(out):
        return f"--out {out} is a folder; name the .pt2 file to write (e.g. {os.path.join(out, 'model.pt2')})"
    if os.path.exists(out) and not overwrite and not is_program(out):
        return f"{out} exists and is not a torch.export program; pass --overwrite to replace it"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m lightning_ood.deploy CKPT --out model.pt2``."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_ood.deploy",
        description="Export a lightning_ood model file (model_with_detectors.ckpt) and its detectors "
                    "to a torch.export program (.pt2) with a dynamic batch dimension.",
    )
    parser.add_argument("checkpoint", help=f"model file written by OODEvaluation ({CHECKPOINT_NAME}) or save_with_detectors")
    parser.add_argument("--out", help="output .pt2 file (default: the checkpoint's name with .pt2)")
    parser.add_argument("--example-batch", type=int, default=2, help="batch size used for tracing (>= 2; default 2)")
    parser.add_argument("--image-size", type=int, default=None, help="input height/width if the file stores no preprocessing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file that is not a .pt2 program")
    args = parser.parse_args(argv)
    out = args.out or os.path.splitext(args.checkpoint)[0] + ".pt2"
    if args.example_batch < 2:
        parser.error("--example-batch must be >= 2")
    refusal = _output_refusal(args.checkpoint, out, args.overwrite)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 1
    try:
        model = load(args.checkpoint)
        export_program(model, out, example_batch=args.example_batch, image_size=args.image_size)
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
