"""Side-by-side crops to look at: LR | bicubic | peers | models | HR, for JPEG'd (or clean) small images.

    python bench/side_by_side.py --images ART/test/lettering_0003.png ART/test/manga_0002.png ... \
        --model models/FlexSR_anime_real_x2.safetensors ../shared/weights/EIMN_A_x2.pth \
        --peers waifu2x-cunet-noise1-scale2x --lr matlab+jpeg75 --crop 96 --out samples/

For each image: a centre crop of ``--crop`` HR pixels (a multiple of the scale), its LR made by ``--lr``
(``training.degradations.make_lr``), then one row of tiles, each shown at the HR size (nearest for the LR):
LR | bicubic | every peer | every model | HR, with labels and each tile's Y-PSNR against the HR. Look for
ringing around lines, halos, 8x8 blocks left over, and texture the HR does not have. The models run at the
scale of the first one; peers at theirs must match.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import archs  # noqa: E402
from bench.evaluate import bicubic_upscale, load_peers  # noqa: E402
from training.data import read_rgb  # noqa: E402
from training.degradations import make_lr  # noqa: E402
from training.metrics import psnr_y  # noqa: E402

LABEL_PX = 14


def crop_hr(path: Path, crop: int, scale: int) -> torch.Tensor:
    arr = read_rgb(path)
    hr = torch.from_numpy(arr).permute(2, 0, 1).float().div(255)[None]
    h, w = hr.shape[-2:]
    c = min(crop, h, w) // scale * scale
    top, left = (h - c) // 2, (w - c) // 2
    return hr[..., top:top + c, left:left + c].contiguous()


def tile(img: torch.Tensor, label: str) -> Image.Image:
    arr = (img[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    body = Image.fromarray(arr)
    out = Image.new("RGB", (body.width, body.height + LABEL_PX), (255, 255, 255))
    out.paste(body, (0, LABEL_PX))
    ImageDraw.Draw(out).text((2, 1), label[: max(4, body.width // 6)], fill=(0, 0, 0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", nargs="+", type=Path, required=True)
    ap.add_argument("--model", nargs="+", type=Path, required=True, help="model files, one scale")
    ap.add_argument("--peers", nargs="*", default=[], help="peer names (bench/peers.py)")
    ap.add_argument("--lr", default="matlab+jpeg75", help="how the small image is made (default: %(default)s)")
    ap.add_argument("--crop", type=int, default=96, help="HR crop side (default: %(default)s)")
    ap.add_argument("--zoom", type=int, default=2, help="nearest-neighbour zoom of every tile (default: %(default)s)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    models = [(p.stem, archs.load_model(p)) for p in args.model]
    scale = models[0][1].scale
    if any(m.scale != scale for _, m in models):
        ap.error("--model files must share one scale")
    peers = []
    if args.peers:
        mod = load_peers()
        peers = [(n, mod.Peer(n)) for n in args.peers]
        if any(p.scale != scale for _, p in peers):
            ap.error(f"--peers must be x{scale} peers")
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        hr = crop_hr(path, args.crop, scale)
        lr = make_lr(hr, scale, args.lr)
        shown = [("LR " + args.lr, F.interpolate(lr, scale_factor=scale, mode="nearest"), None)]
        shown.append(("bicubic", bicubic_upscale(lr, scale).clamp(0, 1), None))
        with torch.no_grad():
            shown += [(n, p(lr), None) for n, p in peers]
            shown += [(n, m(lr).clamp(0, 1), None) for n, m in models]
        shown.append(("HR", hr, None))
        tiles = []
        for label, img, _ in shown:
            img = img[..., : hr.shape[-2], : hr.shape[-1]]
            text = label if label.startswith(("LR", "HR")) else f"{label} {psnr_y(img, hr, scale):.2f}"
            big = F.interpolate(img, scale_factor=args.zoom, mode="nearest")
            tiles.append(tile(big, text))
        sheet = Image.new("RGB", (sum(t.width + 4 for t in tiles), max(t.height for t in tiles)), (255, 255, 255))
        x = 0
        for t in tiles:
            sheet.paste(t, (x, 0))
            x += t.width + 4
        target = args.out / f"{path.stem}_{args.lr.replace('+', '_')}_x{scale}.png"
        sheet.save(target)
        print(f"{target}  ({' | '.join(label for label, _, _ in shown)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
