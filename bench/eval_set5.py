"""Evaluate an SR checkpoint on Set5 in the protocol of the papers' tables, next to bicubic.

    python bench/eval_set5.py                                   # the published EIMN_A x2
    python bench/eval_set5.py --model path/to/model.safetensors --scale 4 --dtype bfloat16

Protocol (as BasicSR / the EIMN authors): the MATLAB-bicubic LR images ``LRbicx{scale}``, the model's
output clipped to [0, 1] and rounded to 8 bits, PSNR/SSIM on the BT.601 Y channel with ``scale``
pixels cropped on each side (see ``training/metrics.py``). Bicubic here is torch's bicubic upscale of
the same LR image (a baseline, not a table figure). Prints per-image figures and the means.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import archs  # noqa: E402
from training.metrics import evaluate_pairs, set5_pairs  # noqa: E402

SHARED = ROOT.parent / "shared"
DEFAULT_MODEL = SHARED / "weights" / "EIMN_A_x2.pth"
DEFAULT_DATA = SHARED / "data" / "Set5"

#: The authors' Set5 figures for their released checkpoints (liux520/EIMN ``Weights/record.txt``; the
#: paper rounds them to 38.26/0.9619 etc.). Y channel, border = scale.
PUBLISHED = {
    ("EIMN_A", 2): (38.26154528022996, 0.961914269670307),
    ("EIMN_A", 3): (34.69612321999318, 0.9298681118933908),
    ("EIMN_A", 4): (32.52410035252859, 0.8992825002770413),
    ("EIMN_L", 2): (38.25744241098361, 0.961921820652068),
    ("EIMN_L", 3): (34.75643967082542, 0.930384781274533),
    ("EIMN_L", 4): (32.63202209242804, 0.9007537502582845),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint (default: %(default)s)")
    parser.add_argument("--scale", type=int, default=None, help="scale factor (default: the model's)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Set5 folder with GTmod12/ and LRbicx*/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--images", nargs="+", metavar="NAME", help="only these images (e.g. bird butterfly)")
    args = parser.parse_args(argv)

    desc = archs.load_model(args.model)
    scale = args.scale or desc.scale
    if scale != desc.scale:
        parser.error(f"--scale {scale} but {args.model.name} is a x{desc.scale} model")
    if not (args.data / f"LRbicx{scale}").is_dir():
        parser.error(f"{args.data} has no LRbicx{scale}/ folder")
    dtype = DTYPES[args.dtype]
    model = desc.model.to(args.device, dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())

    def upscale(lr: torch.Tensor) -> torch.Tensor:
        return model(lr.to(args.device, dtype)).float().cpu()

    start = time.perf_counter()
    pairs = [p for p in set5_pairs(args.data, scale) if not args.images or p[0] in args.images]
    if not pairs:
        parser.error(f"no images to evaluate in {args.data} (--images {' '.join(args.images or [])})")
    result = evaluate_pairs(upscale, pairs, scale)
    seconds = time.perf_counter() - start

    print(f"{args.model.name}: {desc.architecture.name} {' '.join(desc.tags)}, x{scale}, {n_params:,} params, "
          f"Set5 ({result['n']} images), "
          f"{args.device} {args.dtype}, {seconds:.1f} s")
    for key, value in result.items():
        if key.startswith("psnr/"):
            print(f"  {key[5:]:<10} {value:7.3f} dB")
    print(f"  {'':<10} {'PSNR (dB)':>10} {'SSIM':>8}")
    print(f"  {'model':<10} {result['psnr']:10.4f} {result['ssim']:8.6f}")
    print(f"  {'bicubic':<10} {result['bicubic_psnr']:10.4f} {result['bicubic_ssim']:8.6f}")
    print(f"  gain over bicubic: {result['psnr'] - result['bicubic_psnr']:+.3f} dB")
    for tag in desc.tags:
        if (tag, scale) in PUBLISHED:
            psnr, ssim = PUBLISHED[(tag, scale)]
            print(f"  authors' {tag} x{scale}: {psnr:.4f} / {ssim:.6f}  "
                  f"(ours {result['psnr'] - psnr:+.4f} dB, {result['ssim'] - ssim:+.6f} SSIM)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
