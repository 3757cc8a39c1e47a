"""Thumbnails for the example workflows, each made from a real run of that workflow.

    python bench/template_thumbnails.py --input-dir /path/to/ComfyUI/input [--threads 1]

ComfyUI's template browser shows ``example_workflows/<name>.jpg`` beside ``<name>.json``. For each
workflow this script converts it to a prompt (widget values in input order, links), runs it in this
process with the pack's own nodes and small stand-ins for the ComfyUI nodes the workflows use
(LoadImage reading ``--input-dir``, SolidMask, FeatherMask, SaveImage collecting its images), and draws
what the run did: the input beside the output (a crop at the same spot, enlarged alike, so the
difference shows at thumbnail size; RGBA output over a checkerboard), or, for the model workflow, what
was fused and saved and the fused model's output against the unfused model's. The model each workflow
loads is read from the workflow itself (its loader node), never named here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from packutil import load_pack  # noqa: E402

WORKFLOWS = ROOT / "example_workflows"
SIZE = (512, 384)
#: Where the detail crops sit (top, left as fractions of the input): example.png's face, where edges are.
SPOT = (0.17, 0.33)
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}


# --------------------------------------------------------------------------------------------------
# ComfyUI's nodes that the workflows use, as ComfyUI declares and runs them


def load_image(input_dir: Path, image: str):
    """LoadImage: RGB float [1, H, W, 3] and its MASK (1 - alpha; zeros 64×64 without alpha)."""
    pil = Image.open(input_dir / image)
    rgb = torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255)[None]
    if "A" in pil.getbands():
        mask = 1.0 - torch.from_numpy(np.asarray(pil.getchannel("A"), dtype=np.float32) / 255)[None]
    else:
        mask = torch.zeros(1, 64, 64)
    return rgb, mask


def solid_mask(value, width, height):
    return (torch.full((1, height, width), float(value)),)


def feather_mask(mask, left, top, right, bottom):
    """FeatherMask: edge rows/columns scaled by (i + 1) / width of the band, as ComfyUI's loops do."""
    out = mask.reshape(-1, mask.shape[-2], mask.shape[-1]).clone()
    h, w = out.shape[-2:]
    left, right, top, bottom = min(left, w), min(right, w), min(top, h), min(bottom, h)
    for x in range(left):
        out[:, :, x] *= (x + 1.0) / left
    for x in range(right):
        out[:, :, -x] *= (x + 1.0) / right
    for y in range(top):
        out[:, y, :] *= (y + 1.0) / top
    for y in range(bottom):
        out[:, -y, :] *= (y + 1.0) / bottom
    return (out,)


BUILTIN_INPUTS = {
    "LoadImage": ["image", "upload"],
    "SaveImage": ["filename_prefix"],
    "SolidMask": ["value", "width", "height"],
    "FeatherMask": ["left", "top", "right", "bottom"],
}


def widget_names(pack, node_type: str) -> list[str]:
    if node_type in BUILTIN_INPUTS:
        return BUILTIN_INPUTS[node_type]
    spec = pack.NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    return [name for group in ("required", "optional") for name, decl in spec.get(group, {}).items()
            if isinstance(decl[0], (list, tuple)) or decl[0] in WIDGETS]


def run_workflow(pack, workflow: dict, input_dir: Path) -> dict:
    """Run a UI-format workflow; returns {node id: (node type, inputs, outputs)}."""
    links = {link[0]: link for link in workflow["links"]}
    done: dict[int, tuple] = {}
    pending = {n["id"]: n for n in workflow["nodes"]}
    while pending:
        progressed = False
        for node_id, node in list(pending.items()):
            linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
            if any(link[1] not in done for link in linked.values()):
                continue
            kwargs = dict(zip(widget_names(pack, node["type"]), node.get("widgets_values") or []))
            kwargs.pop("upload", None)
            for name, link in linked.items():
                kwargs[name] = done[link[1]][2][link[2]]
            kind = node["type"]
            if kind == "LoadImage":
                out = load_image(input_dir, kwargs["image"])
            elif kind == "SaveImage":
                out = ()
            elif kind == "SolidMask":
                out = solid_mask(**kwargs)
            elif kind == "FeatherMask":
                out = feather_mask(**kwargs)
            else:
                cls = pack.NODE_CLASS_MAPPINGS[kind]
                result = getattr(cls(), cls.FUNCTION)(**kwargs)
                out = result["result"] if isinstance(result, dict) else result
            done[node_id] = (kind, kwargs, out)
            del pending[node_id]
            progressed = True
        if not progressed:
            raise ValueError("the workflow has a cycle or a dangling link")
    return done


# --------------------------------------------------------------------------------------------------
# Drawing


def to_pil(image: torch.Tensor) -> Image.Image:
    """[H, W, C] float 0..1 -> PIL (RGBA over a checkerboard when C == 4)."""
    arr = (image.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    if arr.shape[-1] == 4:
        h, w = arr.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        cell = max(4, min(h, w) // 24)
        board = np.where(((yy // cell + xx // cell) % 2)[..., None] == 0, 200, 140).astype(np.float32)
        a = arr[..., 3:4].astype(np.float32) / 255
        arr = (arr[..., :3] * a + board * (1 - a) + 0.5).astype(np.uint8)
    return Image.fromarray(arr[..., :3])


def font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def card(title: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("RGB", SIZE, (32, 34, 38))
    d = ImageDraw.Draw(im)
    d.text((14, 10), title, fill=(235, 235, 235), font=font(20))
    return im, d


def side_by_side(title: str, left: Image.Image, right: Image.Image, left_label: str, right_label: str,
                 note: str) -> Image.Image:
    im, d = card(title)
    box = 232
    for i, (pic, label) in enumerate(((left, left_label), (right, right_label))):
        x = 14 + i * (box + 20)
        im.paste(pic.resize((box, box), Image.NEAREST if pic.width < box else Image.LANCZOS), (x, 48))
        d.text((x, 48 + box + 8), label, fill=(200, 200, 200), font=font(15))
    d.text((14 + box + 2, 48 + box // 2 - 12), "→", fill=(120, 200, 255), font=font(18))
    d.text((14, SIZE[1] - 30), note, fill=(150, 150, 150), font=font(13))
    return im


def crop_pair(src: torch.Tensor, out: torch.Tensor, frac: float = 0.25):
    """The same region of input [H, W, C] and output [sH, sW, C]: a square ``frac`` of the input's side."""
    h, w = src.shape[:2]
    s = out.shape[0] // h
    side = max(8, int(min(h, w) * frac))
    y, x = int(h * SPOT[0]), int(w * SPOT[1])
    y, x = min(y, h - side), min(x, w - side)
    return src[y : y + side, x : x + side], out[y * s : (y + side) * s, x * s : (x + side) * s]


def thumb_upscale(name: str, run: dict) -> Image.Image:
    (_, load_kw, (src, _)), = [v for v in run.values() if v[0] == "LoadImage"]
    (_, _, (out,)), = [v for v in run.values() if v[0] == "FlexSRUpscaleImage"]
    (_, model_kw, _), = [v for v in run.values() if v[0] == "FlexSRLoadUpscaleModel"]
    src, out = src[0], out[0]
    a, b = crop_pair(src, out)
    h, w = src.shape[:2]
    oh, ow = out.shape[:2]
    return side_by_side(
        "Upscale Image (FlexSR)", to_pil(a), to_pil(b), f"input {w}×{h} (detail)", f"output {ow}×{oh} (detail)",
        f"{model_kw['model_name']} · {load_kw['image']}")


def thumb_rgba(name: str, run: dict) -> Image.Image:
    (_, load_kw, (src, _)), = [v for v in run.values() if v[0] == "LoadImage"]
    (_, _, (out,)), = [v for v in run.values() if v[0] == "FlexSRUpscaleImage"]
    (_, model_kw, _), = [v for v in run.values() if v[0] == "FlexSRLoadUpscaleModel"]
    out = out[0]
    assert out.shape[-1] == 4, "the RGBA workflow must produce RGBA"
    alpha = out[..., 3]
    h, w = src.shape[1:3]
    oh, ow = out.shape[:2]
    return side_by_side(
        "RGBA upscale with a mask", to_pil(src[0]), to_pil(out), f"input {w}×{h} RGB + mask",
        f"output {ow}×{oh} RGBA", f"{model_kw['model_name']} · alpha {float(alpha.min()):.2f}…{float(alpha.max()):.2f}")


def thumb_fuse(name: str, run: dict, pack, input_dir: Path) -> Image.Image:
    (_, model_kw, (model, _info)), = [v for v in run.values() if v[0] == "FlexSRLoadUpscaleModel"]
    (_, _, (fused, count)), = [v for v in run.values() if v[0] == "FlexSRFuseOmniShift"]
    (_, save_kw, (path,)), = [v for v in run.values() if v[0] == "FlexSRSaveUpscaleModel"]
    reloaded = pack.nodes.model_io.load(path)
    src, _ = load_image(input_dir, "example.png")
    h, w = src.shape[1:3]
    side = min(h, w) // 4
    y, x = int(h * SPOT[0]), int(w * SPOT[1])
    patch = src[:, y : y + side, x : x + side]
    engine = pack.nodes.engine
    t0 = time.process_time()
    before, _ = engine.upscale_image(model, patch, device="cpu")
    t1 = time.process_time()
    after, _ = engine.upscale_image(reloaded, patch, device="cpu")
    t2 = time.process_time()
    diff = float((before - after).abs().max())
    im = side_by_side(
        "Fuse OmniShift → Save", to_pil(before[0]), to_pil(after[0]), f"{Path(model_kw['model_name']).stem}",
        f"{Path(path).name} (fused)",
        f"{count} OmniShift modules fused · max difference {diff:.1e} · CPU {t1 - t0:.2f}s → {t2 - t1:.2f}s")
    return im


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input-dir", required=True, type=Path, help="ComfyUI's input folder (holds example.png)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=WORKFLOWS, help="where <name>.jpg goes (default: beside the JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pack = load_pack(ROOT, name="flexsr_template_thumbnails")
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["FLEXSR_UPSCALE_MODELS"] = tmp  # the fuse workflow saves here, not into the pack
        for path in sorted(WORKFLOWS.glob("*.json")):
            workflow = json.loads(path.read_text())
            t0 = time.monotonic()
            run = run_workflow(pack, workflow, args.input_dir)
            kinds = {v[0] for v in run.values()}
            if "FlexSRSaveUpscaleModel" in kinds:
                im = thumb_fuse(path.stem, run, pack, args.input_dir)
            elif any(v[0] == "FlexSRUpscaleImage" and v[2][0].shape[-1] == 4 for v in run.values()):
                im = thumb_rgba(path.stem, run)
            else:
                im = thumb_upscale(path.stem, run)
            target = args.out / f"{path.stem}.jpg"
            im.save(target, quality=88, optimize=True)
            print(f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}: {im.size[0]}×{im.size[1]}, "
                  f"{target.stat().st_size // 1024} KiB, workflow ran in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
