"""Network interpolation: blend the weights of two models of one architecture (ESRGAN's "network
interpolation", chaiNNer's "Interpolate Models").

    python -m training.interpolate A B --alpha 0.7 --out C.safetensors [--overwrite]

Every floating-point tensor of the result is ``(1 - alpha) * A + alpha * B``; integer buffers (such as
batch norm's ``num_batches_tracked``) come from ``A``. Both files load through ``archs.load_model``
(strict keys, any format the loader reads) and must be the same architecture at the same scale with the
same tensors and shapes. A fine-tune and the checkpoint it started from interpolate well: ``alpha``
trades what the fine-tune gained on its own material against what the original was better at.

The output is written atomically as .safetensors and read back through the loader; its metadata records
both parents (file name and SHA-256), ``alpha`` and the command, and keeps ``B``'s metadata (a fine-tune's
command, seed and data manifest) under ``b_`` names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


if __package__ in (None, ""):  # run as a script: python training/interpolate.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "training"

import archs  # noqa: E402
from archs import InterpolationError, interpolate_state_dicts  # noqa: E402,F401 - re-exported for callers

from .models import export_safetensors, lineage  # noqa: E402


def interpolate_files(path_a: str | Path, path_b: str | Path, alpha: float, out: str | Path,
                      overwrite: bool = False, command: str | None = None, use: str | None = None) -> Path:
    """Blend two model files (see the module doc) into ``out`` (.safetensors); returns its path."""
    path_a, path_b, out = Path(path_a), Path(path_b), Path(out)
    if out.is_dir():
        raise InterpolationError(f"--out {out}: is a folder; give the .safetensors file to write, e.g. {out / 'blend.safetensors'}")
    if out.suffix.lower() != ".safetensors":
        raise InterpolationError(f"the output must be a .safetensors file, got {out.name!r}")
    if out.parent.exists() and not out.parent.is_dir():
        raise InterpolationError(f"--out {out}: {out.parent.name!r} is a file, not a folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if out.resolve() in (path_a.resolve(), path_b.resolve()):
        raise InterpolationError("the output must not be one of the inputs")
    da, db = archs.load_model(path_a), archs.load_model(path_b)
    mixed = archs.interpolate_descriptors(da, db, alpha, (path_a.name, path_b.name))
    meta = lineage(path_b, "b")
    meta.update({
        "flexsr_architecture": type(mixed).__name__,
        "scale": str(da.scale),
        "interpolation": f"(1 - alpha) * A + alpha * B, alpha = {alpha:g}",
        **lineage(path_a, "a"),
        "command": command or f"python -m training.interpolate {path_a} {path_b} --alpha {alpha:g} --out {out}",
    })
    if use:
        meta["flexsr_use"] = use  # what the model is for: the loader node's panel shows it first
    return export_safetensors(mixed.cpu().eval(), out, meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.interpolate", description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="first model file (alpha = 0 gives this one)")
    ap.add_argument("b", help="second model file (alpha = 1 gives this one)")
    ap.add_argument("--alpha", type=float, required=True, help="weight of B, 0..1")
    ap.add_argument("--out", required=True, help="output .safetensors file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    ap.add_argument("--use", help="what the blend is for, in a sentence (stored in the file; the loader node shows it)")
    args = ap.parse_args(argv)
    command = "python -m training.interpolate " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        path = interpolate_files(args.a, args.b, args.alpha, args.out, args.overwrite, command, args.use)
    except archs.errors.DiskFullError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (InterpolationError, FileExistsError, archs.FlexSRError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
