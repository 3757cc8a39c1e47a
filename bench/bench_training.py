"""Training benchmark: the embedded default run's held-out gain over bicubic, and edge-weighted vs plain L1.

    python bench/bench_training.py [--ab-steps N] [--skip-default] [--out runs/bench_training]

1. The default run, exactly as ``python training/finetune.py`` with no arguments runs it (a small
   FlexNet, generated anime-style images, 3-minute time budget): held-out Y-PSNR/SSIM against bicubic
   (target: >= 2 dB at x2), steps done and wall time.
2. A/B at equal steps and seed (``--ab-steps`` steps, default: the default run's ``--steps``; no time
   budget; otherwise the default settings): the default loss (plain L1 for the first half, then
   Sobel-edge-weighted L1) against plain L1 all the way. When the default run was step-based with
   the same steps, it is the edge-weighted arm (same weights) and is not trained again. Reported: Y-PSNR over the whole held-out images and over their edge pixels (the 10% of
   pixels with the largest Sobel magnitude of the HR luma), with bicubic's for reference.

Prints figures and writes them to ``<out>/results.json``; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import archs  # noqa: E402
from training import finetune  # noqa: E402
from training.data import val_pairs_from_arrays  # noqa: E402
from training.losses import edge_mask  # noqa: E402
from training.metrics import bicubic_upscale, psnr_y, quantize, rgb_to_y  # noqa: E402
from training.synthetic import make_images  # noqa: E402


def edge_psnr_y(sr: torch.Tensor, hr: torch.Tensor, border: int, fraction: float = 0.1) -> float:
    """Y-PSNR (8-bit, border cropped) over the ``fraction`` of pixels with the strongest HR luma edges."""
    y_sr, y_hr = rgb_to_y(quantize(sr)), rgb_to_y(quantize(hr))
    if border:
        y_sr, y_hr = y_sr[..., border:-border, border:-border], y_hr[..., border:-border, border:-border]
    mask = edge_mask(y_hr, fraction)
    mse = ((y_sr - y_hr) ** 2)[mask].mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


@torch.inference_mode()
def score(model_path: Path | None, pairs, scale: int) -> dict:
    """Mean overall and edge-pixel Y-PSNR of a model file (or bicubic when ``model_path`` is None)."""
    model = archs.load_model(model_path).model.eval() if model_path else None
    rows = {"psnr": [], "edge_psnr": []}
    for _, lr, hr in pairs:
        lr1, hr1 = lr.unsqueeze(0), hr.unsqueeze(0)
        sr = model(lr1).clamp(0, 1) if model is not None else bicubic_upscale(lr1, scale)
        sr = sr[..., : hr.shape[-2], : hr.shape[-1]]
        rows["psnr"].append(psnr_y(sr, hr1, scale))
        rows["edge_psnr"].append(edge_psnr_y(sr, hr1, scale))
    return {k: float(np.mean(v)) for k, v in rows.items()}


def run(argv: list[str]) -> tuple[dict, float]:
    t = time.time()
    rc = finetune.main([*argv, "--overwrite"])  # a re-run of the benchmark replaces its own earlier runs
    if rc != 0:
        raise SystemExit(f"training failed ({rc}): {' '.join(argv)}")
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "summary.json").read_text()), time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ab-steps", type=int, default=None, help="steps of each A/B run (default: the default run's)")
    ap.add_argument("--skip-default", action="store_true", help="only the A/B")
    ap.add_argument("--out", default="runs/bench_training")
    a = ap.parse_args()
    out = Path(a.out)
    defaults = finetune.parse_args([])
    ab_steps = a.ab_steps or defaults.steps
    print(f"# FlexSR training benchmark — {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{defaults.threads or torch.get_num_threads()} thread(s)")
    results: dict = {}

    if not a.skip_default:
        summary, wall = run([*finetune.DEFAULT_ARGS, "--out", str(out / "default"), "--no-progress"])
        results["default"] = {**summary, "wall_s": wall}
        print("\n## 1. Default run (python training/finetune.py)")
        print(f"model {summary['architecture']} x{summary['scale']}, {summary['parameters']:,} params; "
              f"{summary['steps']} steps in {wall:.0f} s wall "
              f"({'the time budget shaped the schedule' if summary['schedule_by_time'] else 'step-based: the budget was not needed'})")
        print(f"held-out Y-PSNR {summary['val_psnr']:.3f} dB vs bicubic {summary['val_bicubic_psnr']:.3f} dB "
              f"-> gain {summary['val_gain_db']:+.3f} dB (target >= +2 dB); SSIM {summary['val_ssim']:.4f} vs "
              f"{summary['val_bicubic_ssim']:.4f}; {summary['val_n']} images")
        shipped = ROOT / "models" / f"{finetune.DEFAULT_NAME}.safetensors"
        if shipped.is_file() and not summary["schedule_by_time"]:
            from safetensors.torch import load_file

            a, b = load_file(str(shipped)), load_file(summary["model"])
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            results["default"]["identical_to_shipped"] = same
            print(f"weights identical to the shipped {shipped.relative_to(ROOT)}: {'yes' if same else 'NO'}")

    held = make_images(defaults.synthetic_val_count, (defaults.synthetic_val_size,) * 2, defaults.seed, "val")
    pairs = val_pairs_from_arrays([(str(i), x) for i, x in enumerate(held)], defaults.scale)
    ab = {}
    for label, weight in (("edge-weighted L1 (default)", str(defaults.edge_weight)), ("plain L1", "0")):
        d = results.get("default")
        if weight != "0" and d and d["steps"] == ab_steps and not d["schedule_by_time"]:
            summary, wall = d, d["wall_s"]  # the default run is this arm, step for step
        else:
            argv = [*finetune.DEFAULT_ARGS, "--time-budget", "0", "--steps", str(ab_steps), "--edge-weight", weight,
                    "--val-every", "0", "--out", str(out / ("ab_edge" if weight != "0" else "ab_l1")), "--no-progress"]
            summary, wall = run(argv)
        ab[label] = {**score(Path(summary["model"]), pairs, defaults.scale), "steps": summary["steps"], "wall_s": wall}
    ab["bicubic"] = score(None, pairs, defaults.scale)
    results["ab"] = ab
    print(f"\n## 2. Edge-weighted vs plain L1, {ab_steps} steps each, seed {defaults.seed}, "
          f"{len(pairs)} held-out images (edge pixels: top 10% Sobel magnitude of HR luma)")
    print(f"{'loss':<28} {'Y-PSNR':>9} {'edge Y-PSNR':>12} {'wall s':>8}")
    for label, r in ab.items():
        print(f"{label:<28} {r['psnr']:>9.3f} {r['edge_psnr']:>12.3f} {r.get('wall_s', float('nan')):>8.0f}")
    e, p = ab["edge-weighted L1 (default)"], ab["plain L1"]
    print(f"edge-weighted minus plain: {e['psnr'] - p['psnr']:+.3f} dB overall, {e['edge_psnr'] - p['edge_psnr']:+.3f} dB on edges")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()
