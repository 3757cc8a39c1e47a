"""Upscale images from the command line or from Python, with the same engine as the ComfyUI node.

    python upscale.py photo.png art/ "scans/*.jpg" --out upscaled/            # FlexSR_anime_x2, or _real_ for JPEGs
    python upscale.py page.webp --model FlexSR_anime_x4 --out big/ --ensemble
    python upscale.py in.png --model ~/models/4x_thing.pth --out out/ --tile 512 --precision fp16

Inputs are files, folders (their images, not recursive unless --recursive) and globs; PNG, JPEG, WebP, BMP and
TIFF in; PNG out (``--format``), alpha kept (RGBA in, RGBA out; grey stays grey). ``--model`` is a file, or the
name of a model in the pack's ``models/`` folder (or in ``$FLEXSR_UPSCALE_MODELS``); ``auto`` (the default)
picks, per image, ``FlexSR_anime_real_x<scale>`` when the image looks JPEG-compressed and ``FlexSR_anime_x<scale>``
otherwise. Outputs are written atomically as ``<name>_<model>.png`` and never replace a file unless
``--overwrite``. Works from the repository root whatever the folder is called.

From Python (run from the pack's folder, or with it on ``sys.path``)::

    from PIL import Image
    from upscale import load, upscale
    model = load("FlexSR_anime_x2")                  # a name from models/, or any checkpoint path
    upscale(model, Image.open("in.png")).save("out.png")
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent
PACK_NAME = "flexsr_pack"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
FORMATS = {"png": ".png", "webp": ".webp", "jpg": ".jpg"}


def load_pack():
    """The pack imported as a package under a private name (its modules use relative imports), whatever its
    folder is called; nothing global changes (no ComfyUI, spandrel's registry untouched)."""
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[PACK_NAME]
            raise
    return sys.modules[PACK_NAME]


class UpscaleError(Exception):
    """A command-line problem with one input, one output or the model (the message says which)."""


# --------------------------------------------------------------------------------------------------
# Library


def model_file(name_or_path: str | os.PathLike) -> Path:
    """A model file from a path, or from a name in the pack's models folders (``FlexSR_anime_x2``, with or
    without its suffix)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise UpscaleError(f"--model {name_or_path}: is a folder, not a model file")
    host = load_pack().nodes.host
    for folder in host.model_folders():
        for suffix in ("", *host.MODEL_EXTENSIONS):
            candidate = folder / f"{name_or_path}{suffix}"
            if candidate.is_file():
                return candidate
    names = ", ".join(Path(n).stem for n in host.model_names()) or "none"
    raise UpscaleError(f"--model {name_or_path}: no such file, and no model of that name in the models folder "
                       f"(there: {names})")


def load(name_or_path: str | os.PathLike):
    """A model (spandrel ``ImageModelDescriptor``) from a file or a name in the models folder."""
    return load_pack().nodes.model_io.load(model_file(name_or_path))


def to_tensor(image):
    """A PIL image -> ComfyUI IMAGE ``[1, H, W, C]`` float 0..1 (grey, RGB or RGBA kept as such; palette
    and 16-bit images converted)."""
    import numpy as np
    import torch

    im = image
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32) / 65535.0
        return torch.from_numpy(np.clip(arr, 0, 1))[None, :, :, None]
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "LA":
        im = im.convert("RGBA")
    elif im.mode not in ("L", "RGB", "RGBA"):
        im = im.convert("RGB")
    arr = np.asarray(im, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(np.ascontiguousarray(arr))[None]


def to_pil(image):
    """ComfyUI IMAGE ``[1, H, W, C]`` (or ``[H, W, C]``) 0..1 -> a PIL image (L, RGB or RGBA)."""
    import numpy as np
    from PIL import Image

    x = image[0] if image.dim() == 4 else image
    arr = (x.clamp(0, 1) * 255).round().byte().cpu().numpy()
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)


def upscale(model, image, *, progress: Optional[Callable[[int, int], None]] = None, **engine_options):
    """Upscale a PIL image (or a ComfyUI IMAGE tensor) with ``model``; returns the same kind. Options are
    those of ``nodes.engine.upscale_image`` (``tile_size``, ``overlap``, ``precision``, ``target_scale``,
    ``ensemble``, ``device``, ...)."""
    import torch

    engine = load_pack().nodes.engine
    as_tensor = isinstance(image, torch.Tensor)
    x = image if as_tensor else to_tensor(image)
    out, _ = engine.upscale_image(model, x, progress=progress, check_cancel=lambda: None, **engine_options)
    return out if as_tensor else to_pil(out)


def choose_threads(model, device: str = "cpu", candidates: Optional[list[int]] = None) -> int:
    """The faster torch thread count for ``model`` on this CPU right now: 1 against every core, timed on a
    64x64 input in turns (on a busy machine one thread is often faster). Sets it and returns it."""
    import importlib

    import torch

    cores = importlib.import_module(f"{load_pack().__name__}.training.threads").cpu_cores()
    candidates = candidates or ([1, cores] if cores > 1 else [1])
    if len(candidates) == 1 or device != "cpu":
        torch.set_num_threads(candidates[0] if device == "cpu" else torch.get_num_threads())
        return torch.get_num_threads()
    x = torch.rand(1, model.input_channels, 64, 64)
    times = {c: [] for c in candidates}
    with torch.inference_mode():
        for _ in range(3):
            for c in candidates:
                torch.set_num_threads(c)
                t = time.perf_counter()
                model(x)
                times[c].append(time.perf_counter() - t)
    best = min(candidates, key=lambda c: (sorted(times[c])[1], c))  # median of three
    torch.set_num_threads(best)
    return best


# --------------------------------------------------------------------------------------------------
# Command line


def find_inputs(items: list[str], recursive: bool) -> list[Path]:
    """Image files named by ``items`` (files, folders, globs), in order, each once."""
    found: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found += sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(item), recursive=recursive))
            found += [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        else:
            raise UpscaleError(f"{item}: no such file or folder")
    seen, unique = set(), []
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python upscale.py", description=__doc__.split("\n\n")[0],
                                 epilog="examples:\n" + "\n".join(__doc__.split("\n\n")[1].splitlines()),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="IN", help="image files, folders or globs")
    ap.add_argument("--out", required=True, metavar="DIR", help="folder for the upscaled images (made if missing)")
    ap.add_argument("--model", default="auto", help="a model file, a name in the models folder, or auto "
                    "(FlexSR_anime_real_x<scale> for images that look JPEG-compressed, else FlexSR_anime_x<scale>)")
    ap.add_argument("--scale", type=float, default=0.0, help="output scale (0 = the model's; with --model auto: 2); "
                    "below the model's an antialiased downscale follows, above it the model runs again")
    ap.add_argument("--tile", type=int, default=0, metavar="PX", help="tile size in input pixels (0 = automatic: "
                    "the whole image in one call when it fits the memory budget)")
    ap.add_argument("--overlap", type=int, default=32, metavar="PX", help="context pixels around each tile")
    ap.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    ap.add_argument("--ensemble", action="store_true", help="average the 8 flips/turns (8x the time, a little cleaner)")
    ap.add_argument("--alpha", choices=("model", "bicubic", "discard"), default="model",
                    help="how an RGBA image's alpha is upscaled")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, default=0, metavar="N", help="CPU threads (0 = measured: 1 against "
                    "every core, the faster)")
    ap.add_argument("--format", choices=tuple(FORMATS), default="png", help="output format (png keeps every bit)")
    ap.add_argument("--recursive", action="store_true", help="look into subfolders of folders given")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.scale < 0 or args.scale > 16:
        ap.error(f"argument --scale: invalid value {args.scale:g}: must be 0 (the model's) or up to 16")
    if args.tile < 0 or args.overlap < 0 or args.threads < 0:
        ap.error("argument --tile/--overlap/--threads: must be 0 or more")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        ap.error(f"argument --out: invalid value {args.out!r}: exists and is not a folder")
    return args


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _write_atomic(image, path: Path, fmt: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if fmt == "jpg":
            image.convert("RGB" if image.mode == "RGBA" else image.mode).save(tmp, format="JPEG", quality=95)
        else:
            image.save(tmp, format=fmt.upper())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    pack = load_pack()
    quality = pack.nodes.quality
    try:
        inputs = find_inputs(args.inputs, args.recursive)
    except UpscaleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not inputs:
        print("error: no images found in the inputs given", file=sys.stderr)
        return 2
    device = _device(args.device)
    scale = int(args.scale) if args.scale and float(args.scale).is_integer() else 2
    models: dict[str, object] = {}

    def model_for(name: str):
        if name not in models:
            models[name] = load(name)
            if device == "cpu":
                if args.threads:
                    import torch

                    torch.set_num_threads(args.threads)
                elif len(models) == 1:
                    n = choose_threads(models[name])
                    print(f"threads: {n} (measured)", file=sys.stderr)
        return models[name]

    try:
        if args.model != "auto":
            model_for(args.model)
    except (UpscaleError, pack.archs.FlexSRError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    bar = tqdm(total=len(inputs), unit="image", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.2f}/{total} images [{elapsed}<{remaining}]")
    for src in inputs:
        try:
            with Image.open(src) as im:
                im.load()
                image = to_tensor(im)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            failed += 1
            tqdm.write(f"skipped {src}: not a readable image ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
            bar.update(1)
            continue
        name = args.model
        note = ""
        if name == "auto":
            looks, score = quality.looks_jpeg(image)
            name = f"FlexSR_anime_real_x{scale}" if looks else f"FlexSR_anime_x{scale}"
            note = f" (looks JPEG-compressed: grid fit {score:.3f})" if looks else ""
        try:
            model = model_for(name)
        except (UpscaleError, pack.archs.FlexSRError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        dst = out_dir / f"{src.stem}_{Path(str(name)).stem}{FORMATS[args.format]}"
        if dst.exists() and not args.overwrite:
            failed += 1
            tqdm.write(f"skipped {src}: {dst} exists (pass --overwrite to replace it)", file=sys.stderr)
            bar.update(1)
            continue
        done = [0.0]

        def progress(d: int, total: int) -> None:
            frac = d / max(total, 1)
            bar.update(frac - done[0])
            done[0] = frac

        try:
            out = upscale(model, image, progress=None if args.no_progress else progress, tile_size=args.tile,
                          overlap=args.overlap, precision=args.precision, target_scale=args.scale,
                          alpha_mode=args.alpha, ensemble=args.ensemble, device=device)
            _write_atomic(to_pil(out), dst, args.format)
        except pack.archs.FlexSRError as e:
            failed += 1
            tqdm.write(f"failed {src}: {type(e).__name__}: {e}", file=sys.stderr)
        except OSError as e:
            failed += 1
            tqdm.write(f"failed {src}: could not write {dst}: {e.strerror or e}", file=sys.stderr)
        else:
            tqdm.write(f"{src} -> {dst} ({image.shape[2]}x{image.shape[1]} -> {out.shape[2]}x{out.shape[1]}, "
                       f"{Path(str(name)).stem}{note})", file=sys.stderr)
        bar.update(1 - done[0])
    bar.close()
    if failed:
        print(f"{failed} of {len(inputs)} image(s) not upscaled", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
