"""What the upscale node's ``ensemble`` input buys: Y-PSNR with and without the 8 flips/turns averaged, and what it
costs in CPU time, through the engine the node uses.

    python bench/bench_ensemble.py [--model models/FlexSR_anime_x2.safetensors] [--art ART/val] [--art-max-images 12]
        [--lr matlab matlab+jpeg75]

Images: Set5 (``../shared/data``) and, with ``--art``, centre crops of 192 px of the art images given. For each
LR kind the table gives the mean Y-PSNR (the papers' protocol, as ``bench/evaluate.py``) of the plain run and of
the ensemble, their difference, and the ratio of CPU times (one thread).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import cpu_info, load_average  # noqa: E402
from bench.evaluate import SHARED, art_hr, bench_pairs, pick_evenly  # noqa: E402
from training.data import find_images  # noqa: E402
from training.degradations import make_lr  # noqa: E402
from training.metrics import psnr_y  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "FlexSR_anime_x2.safetensors")
    ap.add_argument("--art", type=Path, help="art images (the val split)")
    ap.add_argument("--art-max-images", type=int, default=12)
    ap.add_argument("--lr", nargs="+", default=["matlab", "matlab+jpeg75"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import upscale

    model = upscale.load(args.model)
    s = model.scale
    images = []
    for spec in args.lr:
        for name, lr, hr in bench_pairs(SHARED / "data" / "Set5", s, spec):
            images.append((spec, f"Set5/{name}", lr, hr))
        if args.art:
            for path in pick_evenly(find_images(args.art), args.art_max_images):
                hr, why = art_hr(path, 192, s)
                if hr is not None:
                    images.append((spec, f"art/{path.name}", make_lr(hr, s, spec), hr))
    rows: dict[str, dict[str, list[float]]] = {}
    cpu = {"plain": 0.0, "ensemble": 0.0}
    load0 = load_average()
    for spec, name, lr, hr in images:
        x = lr.permute(0, 2, 3, 1).contiguous()
        for mode in ("plain", "ensemble"):
            t = time.process_time()
            out = upscale.upscale(model, x, ensemble=mode == "ensemble", device="cpu")
            cpu[mode] += time.process_time() - t
            sr = out.permute(0, 3, 1, 2)[..., : hr.shape[-2], : hr.shape[-1]]
            rows.setdefault(spec, {}).setdefault(mode, []).append(psnr_y(sr, hr, s))
    print(f"{args.model.name} x{s}: {len(images) // len(args.lr)} images per LR kind (Set5"
          f"{', ' + str(args.art) if args.art else ''}); one thread; {cpu_info()}")
    print(f"{'LR':16s} {'plain':>8s} {'ensemble':>9s} {'gain':>7s}")
    for spec, r in rows.items():
        a, b = float(np.mean(r["plain"])), float(np.mean(r["ensemble"]))
        print(f"{spec:16s} {a:8.3f} {b:9.3f} {b - a:+7.3f}")
    print(f"CPU time: plain {cpu['plain']:.1f} s, ensemble {cpu['ensemble']:.1f} s "
          f"({cpu['ensemble'] / max(cpu['plain'], 1e-9):.1f}x); load average {load0} at start, {load_average()} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
