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

    python -m training.interpolate A C --alpha 0.7 --unblend --out B.safetensors

recovers the fine-tune ``B`` that a blend ``C`` of ``A`` was made from, ``(C - (1 - alpha) * A) / alpha`` in
float64 (a shipped blend and the published checkpoint are enough to continue training from its fine-tune once
the run folder is gone). ``C`` must record that blend (its ``a`` is ``A``'s SHA-256, its alpha ``--alpha``);
the output gets ``B``'s own record back from ``C``'s ``b_`` names, plus how it was recovered.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


if __package__ in (None, ""):  # run as a script: python training/interpolate.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "training"

import archs  # noqa: E402
from archs import InterpolationError, interpolate_state_dicts  # noqa: E402,F401 - re-exported for callers
from archs.files import safetensors_metadata  # noqa: E402

from .models import export_safetensors, file_sha256, lineage  # noqa: E402


def interpolate_files(path_a: str | Path, path_b: str | Path, alpha: float, out: str | Path,
                      overwrite: bool = False, command: str | None = None, use: str | None = None) -> Path:
    """Blend two model files (see the module doc) into ``out`` (.safetensors); returns its path."""
    path_a, path_b, out = Path(path_a), Path(path_b), Path(out)
    _check_out(out, overwrite, (path_a, path_b))
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


def unblend_files(path_a: str | Path, path_blend: str | Path, alpha: float, out: str | Path,
                  overwrite: bool = False, command: str | None = None) -> Path:
    """Write to ``out`` the fine-tune that the blend file ``path_blend`` mixed with ``path_a`` at ``alpha``."""
    path_a, path_blend, out = Path(path_a), Path(path_blend), Path(out)
    _check_out(out, overwrite, (path_a, path_blend))
    da, dc = archs.load_model(path_a), archs.load_model(path_blend)  # damaged files get the loader's own errors
    meta = safetensors_metadata(path_blend)
    made = re.search(r"alpha = ([0-9.eE+-]+)$", meta.get("interpolation", ""))
    if not made or not meta.get("a"):
        raise InterpolationError(f"{path_blend.name} records no blend (no 'interpolation' and 'a' in its metadata): "
                                 "only a file written by python -m training.interpolate can be unblended")
    if abs(float(made.group(1)) - alpha) > 1e-9:
        raise InterpolationError(f"{path_blend.name} was blended at alpha {made.group(1)}, not {alpha:g}")
    sha_a = file_sha256(path_a)
    if meta["a"].split(" sha256=")[-1] != sha_a:
        raise InterpolationError(f"{path_blend.name} was blended from {meta['a']}, not from {path_a.name} "
                                 f"(sha256={sha_a})")
    tuned = archs.interpolate_descriptors(da, dc, alpha, (path_a.name, path_blend.name), unblend=True)
    record = {k[2:]: v for k, v in meta.items() if k.startswith("b_")}
    if "recovered" in record:
        record["recovered_earlier"] = record.pop("recovered")
    record.update({
        "flexsr_architecture": type(tuned).__name__,
        "scale": str(da.scale),
        "recovered": f"({path_blend.name} sha256={file_sha256(path_blend)} - {1 - alpha:g} x {path_a.name} "
                     f"sha256={sha_a}) / {alpha:g}: the model that blend mixed in at alpha {alpha:g} (float64)",
        "recovered_command": command or f"python -m training.interpolate {path_a} {path_blend} --alpha {alpha:g} "
                                        f"--unblend --out {out}",
    })
    return export_safetensors(tuned.cpu().eval(), out, record)


def _check_out(out: Path, overwrite: bool, inputs: tuple[Path, ...]) -> None:
    if out.is_dir():
        raise InterpolationError(f"--out {out}: is a folder; give the .safetensors file to write, e.g. {out / 'blend.safetensors'}")
    if out.suffix.lower() != ".safetensors":
        raise InterpolationError(f"the output must be a .safetensors file, got {out.name!r}")
    if out.parent.exists() and not out.parent.is_dir():
        raise InterpolationError(f"--out {out}: {out.parent.name!r} is a file, not a folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if out.resolve() in tuple(p.resolve() for p in inputs):
        raise InterpolationError("the output must not be one of the inputs")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.interpolate", description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="first model file (alpha = 0 gives this one)")
    ap.add_argument("b", help="second model file (alpha = 1 gives this one)")
    ap.add_argument("--alpha", type=float, required=True, help="weight of B, 0..1")
    ap.add_argument("--out", required=True, help="output .safetensors file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    ap.add_argument("--use", help="what the blend is for, in a sentence (stored in the file; the loader node shows it)")
    ap.add_argument("--unblend", action="store_true",
                    help="B is a blend of A made at --alpha: write the model it blended in, (B - (1 - alpha) A) / alpha")
    args = ap.parse_args(argv)
    command = "python -m training.interpolate " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        if args.unblend:
            if args.use:
                raise InterpolationError("--use names what a blend is for; --unblend writes the fine-tune back")
            path = unblend_files(args.a, args.b, args.alpha, args.out, args.overwrite, command)
        else:
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
