"""Pick how much of a fine-tune to keep: blends of a base model and its fine-tune, scored on held-out art.

    python bench/interpolation_sweep.py --base ../shared/weights/EIMN_A_x2.pth --tuned runs/X/X.safetensors \
        --art ART/val [--alphas 0.1 0.2 0.3 0.5 0.8 1.0] [--lr matlab pil-bicubic lanczos box] \
        [--art-max-images 0] [--art-crop 192] [--out models/NAME.safetensors]

For each ``alpha`` the blend ``(1 - alpha) * base + alpha * tuned`` (``training.interpolate``) is scored with
``bench/evaluate.py``'s protocol on the art images given, for every LR kind of ``--lr``, on the whole set and on
each kind of art (clip art, painting, cartoon, wallpaper, lettering, manga). A blend is eligible only when, with
clean ``matlab`` LR, it is no worse than the base by more than ``--tolerance`` (0.05 dB) on every kind of art:
the guard a shipped model must pass (``--tolerance``: a model made for JPEG'd images may give up 0.5 dB there).
Among the eligible ones the chosen alpha is the one whose *smallest* gain over every (kind, LR kind) cell of
``--objective`` (default: every ``--lr`` kind) is largest (ties: the smaller alpha, closer to the base): a
blend that wins on every kind of art and LR, not one that trades one for another. When none is eligible the base itself
is the choice, and the command says so. Use the validation split here, never the test split (the evaluation
command's table is the test). ``--out`` writes the chosen blend there (its metadata records this sweep's
command and the chosen alpha).
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

DEFAULT_LR = ("matlab", "pil-bicubic", "lanczos", "box")


def pick(gains: dict[float, dict[str, float]], eligible: set[float] | None = None) -> float | None:
    """The eligible alpha whose smallest gain is largest (ties: the smaller alpha); None when none is eligible."""
    pool = sorted(a for a in gains if eligible is None or a in eligible)
    if not pool:
        return None
    return max(pool, key=lambda a: (min(gains[a].values()), -a))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="the model the fine-tune started from (alpha 0)")
    p.add_argument("--tuned", type=Path, required=True, help="the fine-tune (alpha 1)")
    p.add_argument("--art", type=Path, required=True, help="held-out art images (the validation split)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0])
    p.add_argument("--lr", nargs="+", default=list(DEFAULT_LR), metavar="SPEC",
                   help="LR kinds scored (bench/evaluate.py --lr; default: %(default)s); matlab is always included")
    p.add_argument("--tolerance", type=float, default=0.05, metavar="DB",
                   help="largest loss against the base on clean LR on any kind of art (default: %(default)s dB)")
    p.add_argument("--scope", choices=("kinds", "overall"), default="kinds",
                   help="kinds: the clean guard and the objective hold on every kind of art (a model for clean images); "
                   "overall: on the art set as a whole (a model made for JPEG'd images, whose clean loss is allowed)")
    p.add_argument("--objective", nargs="+", default=None, metavar="SPEC",
                   help="LR kinds whose smallest per-kind gain the choice maximises (default: every --lr kind); "
                   "e.g. matlab+jpeg75 matlab+jpeg90 for a model made for JPEG'd images")
    p.add_argument("--art-max-images", type=int, default=0)
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
    if evaluate.CLEAN not in args.lr:
        args.lr = [evaluate.CLEAN, *args.lr]
    args.objective = args.objective or list(args.lr)
    unknown = [o for o in args.objective if o not in args.lr]
    if unknown:
        p.error(f"argument --objective: {', '.join(unknown)} not among --lr {' '.join(args.lr)}")
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
             "--art-crop", str(args.art_crop), "--threads", str(args.threads), "--lr", *args.lr,
             "--model", str(args.base), *[str(blends[a]) for a in alphas]])
        result = evaluate.run(ev_args)
    rows = result["rows"]
    kinds = [g for g in result["groups"] if g.startswith("art:")]
    scale = evaluate.archs.load_model(args.base).scale
    base_row = next(r for r in rows if r.kind != "bicubic" and r.path == args.base)
    blend_rows = {a: next(r for r in rows if r.path == blends[a]) for a in alphas}

    def gain(a: float, group: str, spec: str) -> float:
        c = evaluate.column(group, spec)
        return blend_rows[a].mean(c)[0] - base_row.mean(c)[0]

    scope = kinds if args.scope == "kinds" else ["art"]
    gains = {a: {f"{g}|{spec}": gain(a, g, spec) for g in scope for spec in args.objective} for a in alphas}
    clean_worst = {a: min(gain(a, g, evaluate.CLEAN) for g in scope) for a in alphas}
    eligible = {a for a in alphas if clean_worst[a] >= -args.tolerance}
    chosen = pick(gains, eligible)
    counts = ", ".join(f"{g[4:]} {result['counts'][evaluate.column(g, evaluate.CLEAN)]}" for g in kinds)
    print(f"x{scale}: blends of {args.base.name} (alpha 0) and {args.tuned.name} (alpha 1) on "
          f"{result['art_files']} files of {args.art} (crop {args.art_crop}; {counts}); Y-PSNR gain over the base, dB")
    print("alpha  " + "  ".join(f"{spec + ' (all / worst kind)':>30}" for spec in args.lr)
          + "  clean worst kind  smallest gain")
    for a in alphas:
        cells = "  ".join(f"{gain(a, 'art', spec):>+17.3f} / {min(gain(a, g, spec) for g in kinds):+.3f}"
                          .rjust(30) for spec in args.lr)
        mark = "  <- chosen" if a == chosen else ("" if a in eligible else "  (fails the clean guard)")
        print(f"{a:<5g}  {cells}  {clean_worst[a]:>+16.3f}  {min(gains[a].values()):>+13.3f}{mark}")
    print("per kind, clean LR: " + "; ".join(
        f"alpha {a:g}: " + ", ".join(f"{g[4:]} {gain(a, g, evaluate.CLEAN):+.2f}" for g in kinds) for a in alphas))
    print(f"load average {load_average()}")
    if chosen is None:
        print(f"no blend passes the clean guard ({'every kind of art' if args.scope == 'kinds' else 'the art set'} "
              f"within {args.tolerance:g} dB of the base): "
              f"ship the base model {args.base.name} itself")
        return 0
    if args.out is not None:
        path = interpolate_files(args.base, args.tuned, chosen, args.out, overwrite=args.overwrite,
                                 command=f"{command}  (chosen alpha {chosen:g})")
        print(f"wrote {path} (alpha {chosen:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
