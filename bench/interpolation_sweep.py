"""Pick how much of a fine-tune to keep: blends of a base model and its fine-tune, scored on held-out art.

    python bench/interpolation_sweep.py --base ../shared/weights/EIMN_A_x2.pth --tuned runs/X/X.safetensors \
        --art ART/val [--alphas 0.3 0.4 0.5 0.6 0.7 0.8 1.0] [--art-max-images 40] [--art-crop 192] \
        [--out models/NAME.safetensors]

For each ``alpha`` the blend ``(1 - alpha) * base + alpha * tuned`` (``training.interpolate``) is scored with
``bench/evaluate.py``'s protocol on the art images given (LR by MATLAB bicubic, bilinear and area: the
evaluation command's three art columns), and its gain over ``base`` is printed per column. The chosen
alpha is the one whose *smallest* gain over the three columns is largest (ties: the smaller alpha, closer
to the base): a blend that wins on every kind of LR, not one that trades one column for another. Use the
validation split here, never the test split (the evaluation command's table is the test). ``--out``
writes the chosen blend there (its metadata records this sweep's command and the chosen alpha).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import evaluate  # noqa: E402
from bench.common import load_average  # noqa: E402
from training.interpolate import interpolate_files  # noqa: E402

COLUMNS = tuple(f"art-{m}" for m in evaluate.ART_MODES)


def pick(gains: dict[float, dict[str, float]]) -> float:
    """The alpha whose smallest gain is largest (ties: the smaller alpha)."""
    return max(sorted(gains), key=lambda a: (min(gains[a].values()), -a))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="the model the fine-tune started from (alpha 0)")
    p.add_argument("--tuned", type=Path, required=True, help="the fine-tune (alpha 1)")
    p.add_argument("--art", type=Path, required=True, help="held-out art images (the validation split)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0])
    p.add_argument("--art-max-images", type=int, default=40)
    p.add_argument("--art-crop", type=int, default=192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the chosen blend here (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    if any(not 0.0 < a <= 1.0 for a in args.alphas):
        p.error(f"--alphas must be in (0, 1], got {args.alphas}")
    for path in (args.base, args.tuned):
        if not path.is_file():
            p.error(f"{path} does not exist")
    if not args.art.is_dir():
        p.error(f"--art {args.art} is not a folder")
    if args.out is not None and args.out.exists() and not args.overwrite:
        p.error(f"--out {args.out} exists; pass --overwrite to replace it")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python bench/interpolation_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
    alphas = sorted(set(args.alphas))
    with tempfile.TemporaryDirectory(prefix="flexsr-sweep-") as tmp:
        blends = {}
        for a in alphas:
            if a == 1.0:
                blends[a] = args.tuned
                continue
            blends[a] = interpolate_files(args.base, args.tuned, a, Path(tmp) / f"alpha_{a:g}.safetensors")
        ev_args = evaluate.parse_args(
            ["--no-published", "--sets", "--art", str(args.art), "--art-max-images", str(args.art_max_images),
             "--art-crop", str(args.art_crop), "--threads", str(args.threads),
             "--model", str(args.base), *[str(blends[a]) for a in alphas]])
        result = evaluate.run(ev_args)
    rows = result["rows"]
    scale = evaluate.archs.load_model(args.base).scale
    base_row = next(r for r in rows if r.kind != "bicubic" and r.path == args.base)
    blend_rows = {a: next(r for r in rows if r.path == blends[a]) for a in alphas}
    gains = {a: {c: blend_rows[a].mean(c)[0] - base_row.mean(c)[0] for c in COLUMNS} for a in alphas}
    chosen = pick(gains)
    print(f"x{scale}: blends of {args.base.name} (alpha 0) and {args.tuned.name} (alpha 1) on "
          f"{result['art_files']} files of {args.art} (crop {args.art_crop}); Y-PSNR dB, gain over the base")
    print("alpha  " + "  ".join(f"{c:>22}" for c in COLUMNS) + "  smallest gain")
    print("0      " + "  ".join(f"{base_row.mean(c)[0]:>13.2f}         " for c in COLUMNS))
    for a in alphas:
        cells = "  ".join(f"{blend_rows[a].mean(c)[0]:>13.2f} ({gains[a][c]:+.2f})" for c in COLUMNS)
        mark = "  <- chosen" if a == chosen else ""
        print(f"{a:<5g}  {cells}  {min(gains[a].values()):+.2f}{mark}")
    print(f"load average {load_average()}")
    if args.out is not None:
        path = interpolate_files(args.base, args.tuned, chosen, args.out, overwrite=args.overwrite,
                                 command=f"{command}  (chosen alpha {chosen:g})")
        print(f"wrote {path} (alpha {chosen:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
