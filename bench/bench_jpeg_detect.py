"""How well the upscale node tells JPEG'd images from clean ones (``nodes/quality.py``).

    python bench/bench_jpeg_detect.py --art ART [--qualities 60 70 80 90 95] [--max-images 0]

Each image of ``ART/val`` and ``ART/test`` is scored clean and saved as a JPEG (pillow, 4:2:0) at each quality.
The threshold that best separates clean from JPEG'd images (balanced accuracy over all qualities) is chosen
on the val split; the table gives, on the test split, the share of clean images called clean and of JPEG'd
images called JPEG at each quality, per kind of art, at that threshold and at the one the node uses
(``nodes.quality.JPEG_THRESHOLD``).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import cpu_info, load_average  # noqa: E402
from bench.evaluate import art_kind, pick_evenly  # noqa: E402
from training.data import find_images, read_rgb  # noqa: E402


def load_quality():
    spec = importlib.util.spec_from_file_location("flexsr_quality", ROOT / "nodes" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def as_image(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(arr, dtype=np.float32)) / 255.0


def jpeg_round_trip(arr: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=2)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def scores(folder: Path, qualities: list[int], max_images: int, quality_module) -> list[tuple[str, dict]]:
    out = []
    for path in pick_evenly(find_images(folder), max_images):
        arr = read_rgb(path)
        row = {0: quality_module.blockiness(as_image(arr))}
        for q in qualities:
            row[q] = quality_module.blockiness(as_image(jpeg_round_trip(arr, q)))
        out.append((art_kind(path.name), row))
    return out


def accuracy(rows, threshold: float, qualities: list[int]) -> dict:
    acc = {"clean": float(np.mean([r[0] < threshold for _, r in rows]))}
    for q in qualities:
        acc[q] = float(np.mean([r[q] >= threshold for _, r in rows]))
    return acc


def balanced(rows, threshold: float, qualities: list[int]) -> float:
    a = accuracy(rows, threshold, qualities)
    return 0.5 * a["clean"] + 0.5 * float(np.mean([a[q] for q in qualities]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--art", type=Path, required=True, help="the art set (with val/ and test/)")
    p.add_argument("--qualities", type=int, nargs="+", default=[60, 70, 80, 90, 95])
    p.add_argument("--max-images", type=int, default=0, help="per split, spread evenly (0 = all)")
    p.add_argument("--max-side", type=int, default=0,
                   help="side of the centre crop the measure reads (default: the node's MAX_SIDE)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    quality = load_quality()
    if args.max_side:
        quality.MAX_SIDE = args.max_side
    print(f"measure on a centre crop of at most {quality.MAX_SIDE} px a side")
    t0, load0 = time.process_time(), load_average()
    val = scores(args.art / "val", args.qualities, args.max_images, quality)
    test = scores(args.art / "test", args.qualities, args.max_images, quality)
    grid = np.linspace(0.0, 0.2, 201)
    chosen = float(max(grid, key=lambda t: (balanced(val, t, args.qualities), -t)))
    n_calls = (len(val) + len(test)) * (1 + len(args.qualities))
    print(f"val {len(val)} images, test {len(test)}; qualities {args.qualities} (pillow, 4:2:0); "
          f"{(time.process_time() - t0) / n_calls * 1000:.0f} ms CPU per image scored")
    print(f"threshold chosen on val: {chosen:.3f} (balanced accuracy {balanced(val, chosen, args.qualities):.3f}); "
          f"the node's JPEG_THRESHOLD: {quality.JPEG_THRESHOLD}")
    for label, thr in (("chosen", chosen), ("node", quality.JPEG_THRESHOLD)):
        print(f"\ntest split at threshold {thr:.3f} ({label}): share called right")
        kinds = sorted({k for k, _ in test})
        print("kind          n   clean  " + "  ".join(f"q{q:<4d}" for q in args.qualities))
        for kind in ["all", *kinds]:
            rows = [r for r in test if kind == "all" or r[0] == kind]
            a = accuracy(rows, thr, args.qualities)
            print(f"{kind:<12s}{len(rows):>3d}   {a['clean']:.3f}  " + "  ".join(f"{a[q]:.3f}" for q in args.qualities))
    print(f"\nmedian blockiness on test: clean {np.median([r[0] for _, r in test]):.3f}, "
          + ", ".join(f"q{q} {np.median([r[q] for _, r in test]):.3f}" for q in args.qualities))
    print(f"load average {load0} at start, {load_average()} at end; {cpu_info()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
