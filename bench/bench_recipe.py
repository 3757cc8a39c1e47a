"""The training recipe measured on real drawn art: plain L1, edge-weighted L1, edge-weighted L1 + GAN.

    python -m training.art build data/art                       # once (see training/art.py)
    python bench/bench_recipe.py --data data/art/train --val data/art/val [--steps 600] \\
        [--curves runs/FlexSR_anime_x2 runs/FlexSR_anime_x4]
    python bench/bench_recipe.py --curves runs/FlexSR_anime_x2     # only the learning curves

Each arm trains the same model from the same seed on the same batches (batch k is a pure function of
the seed) for the same number of steps; only the loss differs:

- ``plain L1``: ``--edge-weight 0``;
- ``edge-weighted L1``: the default loss (plain L1 for the first half, then Sobel-edge-weighted L1);
- ``edge-weighted L1 + GAN``: the same plus ``--gan vit`` (a small ViT discriminator, hinge loss) from
  the second half on.

Held-out figures (LR by antialiased bicubic, the --val images, centre crops): Y-PSNR over whole crops and
over their edge pixels (the 10% with the strongest Sobel magnitude of the HR luma), bicubic for reference.
A side-by-side PNG shows HR | bicubic | each arm on a few held-out crops. ``--curves`` prints the
held-out learning curve (the ``val`` records of ``metrics.jsonl``) of finished or running training runs,
e.g. the shipped models'. Prints figures and writes ``<out>/results.json``; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_training import run, score  # noqa: E402
from training.checkpoint import read_jsonl  # noqa: E402
from training.data import val_pairs_from_folder  # noqa: E402
from training.metrics import bicubic_upscale  # noqa: E402

ARMS = {
    "plain L1": ["--edge-weight", "0"],
    "edge-weighted L1": ["--edge-weight", "1"],
    "edge-weighted L1 + GAN": ["--edge-weight", "1", "--gan", "vit", "--gan-args",
                               '{"dim": 64, "depth": 2, "heads": 4, "mlp_dim": 128, "patch_size": 8}'],
}


def learning_curve(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "val"]


@torch.inference_mode()
def side_by_side(models: dict[str, Path], pairs, scale: int, path: Path, count: int = 4, crop: int = 96) -> Path:
    import archs
    from PIL import Image, ImageDraw

    loaded = {k: archs.load_model(v).model.eval() for k, v in models.items()}
    rows = []
    for _, lr, hr in pairs[:count]:
        lr1 = lr.unsqueeze(0)
        tiles = [hr, bicubic_upscale(lr1, scale)[0]]
        tiles += [m(lr1).clamp(0, 1)[0, :, : hr.shape[-2], : hr.shape[-1]] for m in loaded.values()]
        y0, x0 = (hr.shape[-2] - crop) // 2, (hr.shape[-1] - crop) // 2
        tiles = [t[:, y0:y0 + crop, x0:x0 + crop] for t in tiles]
        tiles = [F.interpolate(t[None], scale_factor=2, mode="nearest")[0] for t in tiles]  # show the pixels
        rows.append(torch.cat([torch.cat([t, torch.ones(3, t.shape[1], 4)], 2) for t in tiles], 2))
    grid = torch.cat([torch.cat([r, torch.ones(3, 4, r.shape[2])], 1) for r in rows], 1)
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.new("RGB", (arr.shape[1], arr.shape[0] + 16), (255, 255, 255))
    img.paste(Image.fromarray(arr), (0, 16))
    d = ImageDraw.Draw(img)
    for i, label in enumerate(["HR", "bicubic", *loaded]):
        d.text((i * (2 * crop + 4) + 2, 2), label, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def print_curves(run_dirs, results: dict) -> None:
    """Print (and keep in ``results``) the held-out learning curve of each training run folder."""
    for run_dir in map(Path, run_dirs):
        curve = learning_curve(run_dir)
        results.setdefault("curves", {})[str(run_dir)] = curve
        print(f"\nheld-out learning curve of {run_dir} ({len(curve)} points): step, Y-PSNR, gain over bicubic")
        for r in curve:
            print(f"  {r['step']:>6} {r['psnr']:>9.3f} {r['gain_db']:>+8.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", help="training folders (e.g. the art set's train split)")
    ap.add_argument("--val", help="held-out folder (e.g. the art set's val split)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--arch", default="FlexNet")
    ap.add_argument("--arch-args", default='{"dim":16,"num_blocks":[2,2],"window_size":8,"hidden_rate":2,"upsampler":"ps"}')
    ap.add_argument("--pretrained", default=None, help="fine-tune this checkpoint in every arm instead of --arch")
    ap.add_argument("--extra", default="--lr 2e-3 --lr-warmup 30 --ema 0.99 --batch-size 8 --patch-size 64",
                    help="further finetune.py options shared by every arm")
    ap.add_argument("--val-crop", type=int, default=128)
    ap.add_argument("--val-max-images", type=int, default=32)
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--curves", nargs="*", default=[], metavar="RUN_DIR", help="print these runs' held-out curves")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_recipe")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    if not (a.data and a.val):
        if not a.curves:
            ap.error("--data and --val are needed to run the arms (or give only --curves RUN_DIR ...)")
        print_curves(a.curves, {})  # only the learning curves of earlier runs
        return
    model_args = ["--pretrained", a.pretrained] if a.pretrained else ["--arch", a.arch, "--arch-args", a.arch_args]
    common = [*model_args, "--scale", str(a.scale), "--data", *a.data, "--steps", str(a.steps), "--seed", str(a.seed),
              "--threads", str(a.threads), "--val-every", "0", "--save-every", "0", "--no-progress", "--overwrite",
              *a.extra.split()]
    print(f"# FlexSR recipe A/B on drawn art — {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{a.threads} thread(s), load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"model: {a.pretrained or a.arch} x{a.scale}; {a.steps} steps per arm, seed {a.seed}; shared options: {a.extra}")
    pairs = val_pairs_from_folder(a.val, a.scale, a.val_crop, a.val_max_images)
    # crops that bicubic already reproduces exactly (one colour, mostly) have an infinite PSNR for every arm
    kept = [(n, lr, hr) for n, lr, hr in pairs if math.isfinite(score(None, [(n, lr, hr)], a.scale)["psnr"])]
    flat, pairs = len(pairs) - len(kept), kept
    results: dict = {"bicubic": score(None, pairs, a.scale)}
    models: dict[str, Path] = {}
    for name in a.arms:
        slug = name.replace(" ", "_").replace("+", "plus").replace("-", "_")
        summary, wall = run([*common, *ARMS[name], "--out", str(out / slug)])
        models[name] = Path(summary["model"])
        results[name] = {**score(models[name], pairs, a.scale), "steps": summary["steps"], "wall_s": wall}
    print(f"\nheld-out: {len(pairs)} images of {a.val} (centre {a.val_crop} px crops, LR by antialiased bicubic; "
          f"{flat} crops that bicubic reproduces exactly left out); "
          "edge pixels = top 10% Sobel magnitude of HR luma")
    print(f"{'arm':<26} {'Y-PSNR':>9} {'edge Y-PSNR':>12} {'wall s':>8}")
    for name, r in results.items():
        print(f"{name:<26} {r['psnr']:>9.3f} {r['edge_psnr']:>12.3f} {r.get('wall_s', float('nan')):>8.0f}")
    if "plain L1" in results and "edge-weighted L1" in results:
        e, p = results["edge-weighted L1"], results["plain L1"]
        print(f"edge-weighted minus plain: {e['psnr'] - p['psnr']:+.3f} dB overall, {e['edge_psnr'] - p['edge_psnr']:+.3f} dB on edges")
    if "edge-weighted L1 + GAN" in results and "edge-weighted L1" in results:
        g, e = results["edge-weighted L1 + GAN"], results["edge-weighted L1"]
        print(f"PSNR cost of the GAN loss: {g['psnr'] - e['psnr']:+.3f} dB overall, {g['edge_psnr'] - e['edge_psnr']:+.3f} dB on edges")
    png = side_by_side(models, pairs, a.scale, out / "recipe_side_by_side.png")
    print(f"side-by-side (HR | bicubic | {' | '.join(models)}): {png}")
    print_curves(a.curves, results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()
