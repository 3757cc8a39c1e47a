"""One evaluation of Y-PSNR / SSIM: bicubic, the published checkpoints, any model files and the classic anime
upscalers (peers), on Set5, Set14 and a held-out art split (per kind of art), for every kind of small image a
user has: clean MATLAB bicubic, PIL bicubic, PIL Lanczos, box, and bicubic saved as JPEG 90 / 75.

    python bench/evaluate.py                                    # bicubic + ../shared/weights, Set5 + Set14
    python bench/evaluate.py --art ART/test --model models/FlexSR_anime_x2.safetensors --peers all \
        --guard --json eval.json --markdown eval.md

Protocol (the tables of SR papers, ``../shared/data/README.md``): model output clipped to [0, 1], x255,
rounded; PSNR and SSIM on the BT.601 Y channel with ``scale`` pixels cropped on each side; SSIM with an
11x11 Gaussian window, sigma 1.5 (:mod:`training.metrics`).

Rows, one per (scale, model), for every scale in ``--scales`` and every ``--model`` file's scale:
``bicubic`` (MATLAB ``imresize`` bicubic upscale of the LR image, the "Bicubic" row of the papers;
:mod:`training.imresize`), every checkpoint in ``--weights`` (default ``<repo>/../shared/weights``)
whose scale is one of ``--scales``, each ``--model`` file at its own scale, and each ``--peers`` upscaler
(waifu2x, Real-CUGAN, realesr-animevideov3 through ncnn on the CPU: ``bench/peers.py``, bench-only packages
of ``bench/requirements-peers.txt``) at its scale. Models run on the whole image with ``torch.no_grad()`` in
fp32 on ``--threads`` CPU threads; LR images larger than ``--whole-max``² pixels go through the pack's tiled
engine (``nodes/engine.py``) instead.

LR kinds (``--lr``, :func:`training.degradations.make_lr`; every LR is rounded to 8 bits, as a stored image
is): ``matlab`` (MATLAB bicubic, the papers' LR; Set5/Set14 use their shipped ``LRbicx{s}`` files),
``pil-bicubic``, ``lanczos``, ``box`` (pillow's filters, what editors and thumbnailers use), ``bilinear``
(plain bilinear sampling, aliased), and ``<kind>+jpeg<Q>`` (that image saved as a JPEG of quality Q, 4:2:0).

Groups (the columns of each LR kind's table): ``Set5`` and ``Set14`` (``GTmod12`` HR), and with ``--art DIR``
the HR images under ``DIR`` (recursively; alpha over white), optionally centre-cropped to ``--art-crop`` px
and cropped to a multiple of every evaluated scale: ``art`` (all of them) and ``art:<kind>`` per kind of art
(the file name's prefix: clipart, painting, cartoon, wallpaper, lettering, manga; ``training.art.KINDS``).

A second table per LR kind gives each row's difference to ``--reference`` (default EIMN_A) at the same scale.
``--guard [NAME ...]`` checks every ``--model`` row (or those named by file stem) against the reference at its
scale on clean ``matlab`` LR: no worse by more than ``--guard-tolerance`` (0.05 dB) on Set5, on Set14 and on
each kind of art; the command exits 3 when one is.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import archs  # noqa: E402
from archs.errors import FlexSRError  # noqa: E402
from bench.common import cpu_info, load_average  # noqa: E402
from training.art import KINDS  # noqa: E402
from training.data import find_images, read_rgb  # noqa: E402
from training.degradations import make_lr, parse_lr_spec  # noqa: E402
from training.imresize import imresize  # noqa: E402
from training.metrics import load_image, psnr_y, quantize, ssim_y  # noqa: E402

SHARED = ROOT.parent / "shared"
BENCH_SETS = ("Set5", "Set14")
#: The LR kinds every table reports (``--lr``): clean, editors' downscalers, and JPEG'd bicubic.
LR_SPECS = ("matlab", "pil-bicubic", "lanczos", "box", "matlab+jpeg90", "matlab+jpeg75")
#: The clean LR the guard and the papers' tables use.
CLEAN = "matlab"
MODEL_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt", ".bin")
#: SSIM's 11x11 window must fit once ``scale`` pixels are cropped on each side.
MIN_SIDE = 11

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


@dataclass
class Row:
    """One line of the table: a model (or bicubic) at one scale, with its per-column scores."""

    name: str
    scale: int
    kind: str  # "bicubic", "published", "model" or "peer"
    path: Path | None = None
    desc: object = None  # a spandrel descriptor, or a peer (bench/peers.py)
    params: int = 0
    tags: tuple[str, ...] = ()
    scores: dict[str, list[tuple[str, float, float]]] = field(default_factory=dict)
    seconds: float = 0.0

    def mean(self, column: str) -> tuple[float, float] | None:
        got = self.scores.get(column)
        if not got:
            return None
        return float(np.mean([p for _, p, _ in got])), float(np.mean([s for _, _, s in got]))


# --------------------------------------------------------------------------------------------------
# Images


def to_8bit(img: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels (float32, 0..1): what saving the image as a PNG would keep."""
    return quantize(img).float()


def bicubic_upscale(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The papers' "Bicubic" row: MATLAB ``imresize(lr, scale, 'bicubic')`` (float, unclipped)."""
    return imresize(lr, scale).float()


def bench_pairs(root: Path, scale: int, spec: str = CLEAN, names: list[str] | None = None):
    """``(name, lr, hr)`` ``[1, 3, h, w]`` tensors of a benchmark folder (``GTmod12`` HR).

    Clean ``matlab`` LR comes from the shipped ``LRbicx{scale}`` files (made here by MATLAB bicubic when the
    folder is missing); every other LR kind is made from the HR by :func:`training.degradations.make_lr`.
    """
    lr_dir = root / f"LRbicx{scale}"
    for hr_path in sorted((root / "GTmod12").glob("*.png")):
        if names and hr_path.stem not in names:
            continue
        hr = load_image(hr_path).unsqueeze(0)
        hr = hr[..., : hr.shape[-2] // scale * scale, : hr.shape[-1] // scale * scale]
        if spec == CLEAN and lr_dir.is_dir():
            lr = load_image(lr_dir / hr_path.name).unsqueeze(0)
        else:
            lr = make_lr(hr, scale, spec)
        yield hr_path.stem, lr, hr


def art_kind(name: str) -> str:
    """The kind of an art-set image from its file name (``clipart_....png``, ``manga_0001.png``; else ``other``)."""
    prefix = Path(name).name.split("_", 1)[0]
    return prefix if prefix in KINDS else "other"


def pick_evenly(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when ``n`` <= 0 or ``n`` >= len)."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def art_hr(path: Path, crop: int, multiple: int) -> tuple[torch.Tensor | None, str]:
    """``([1, 3, H, W] HR, "")`` of an art image: centre crop to ``crop`` px (0 = whole), then cropped
    to a multiple of ``multiple`` (top-left kept, like MATLAB's ``modcrop``). ``(None, reason)`` for an
    image too small to score or of one colour (every method is exact there: PSNR would be infinite)."""
    arr = read_rgb(path)
    hr = torch.tensor(arr).permute(2, 0, 1).float().div(255.0).unsqueeze(0)
    if crop > 0:
        h, w = hr.shape[-2:]
        ch, cw = min(crop, h), min(crop, w)
        top, left = (h - ch) // 2, (w - cw) // 2
        hr = hr[..., top : top + ch, left : left + cw]
    h, w = hr.shape[-2] // multiple * multiple, hr.shape[-1] // multiple * multiple
    if min(h, w) < MIN_SIDE + 2 * multiple:
        return None, "too small"
    hr = hr[..., :h, :w].contiguous()
    if bool((hr == hr[..., :1, :1]).all()):
        return None, "one colour"
    return hr, ""


# --------------------------------------------------------------------------------------------------
# Models


def load_pack():
    """The pack as a package (its nodes use relative imports), for the tiled engine."""
    name = "flexsr_evaluate_pack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def model_row(path: Path, kind: str) -> Row:
    desc = archs.load_model(path)
    desc.model.eval()
    return Row(name=path.stem, scale=int(desc.scale), kind=kind, path=path, desc=desc,
               params=sum(p.numel() for p in desc.model.parameters()), tags=tuple(desc.tags))


def published_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in MODEL_SUFFIXES and p.is_file())


class Runner:
    """Upscales ``[1, 3, h, w]`` LR images with a row's model (whole image, or tiled when large) or peer."""

    def __init__(self, device: str, whole_max: int, tile: int):
        self.device = torch.device(device)
        self.whole_max = whole_max
        self.tile = tile
        self.tiled = 0

    @torch.no_grad()
    def __call__(self, row: Row, lr: torch.Tensor) -> torch.Tensor:
        if row.desc is None:
            return bicubic_upscale(lr, row.scale)
        if row.kind == "peer":
            return row.desc(lr.float())
        desc = row.desc
        if lr.shape[-2] * lr.shape[-1] <= self.whole_max**2:
            desc.model.to(self.device)
            return desc(lr.to(self.device, torch.float32)).float().cpu()
        self.tiled += 1
        engine = load_pack().nodes.engine
        image = lr.permute(0, 2, 3, 1).contiguous()
        out, _ = engine.upscale_image(desc, image, tile_size=self.tile, precision="fp32", device=self.device)
        return out.permute(0, 3, 1, 2)


def score(row: Row, column: str, name: str, sr: torch.Tensor, hr: torch.Tensor) -> None:
    sr = sr[..., : hr.shape[-2], : hr.shape[-1]]
    row.scores.setdefault(column, []).append((name, psnr_y(sr, hr, row.scale), ssim_y(sr, hr, row.scale)))


# --------------------------------------------------------------------------------------------------
# Tables


def cell(value: tuple[float, float] | None) -> str:
    return "-" if value is None else f"{value[0]:.2f} / {value[1]:.4f}"


def delta_cell(value, ref) -> str:
    if value is None or ref is None:
        return "-"
    return f"{value[0] - ref[0]:+.2f} / {value[1] - ref[1]:+.4f}"


def reference_row(rows: list[Row], scale: int, reference: str) -> Row | None:
    """The published (else any) row at ``scale`` whose name or tags start with ``reference``."""
    found = [r for r in rows if r.scale == scale and r.desc is not None
             and (r.name.startswith(reference) or reference in r.tags)]
    found.sort(key=lambda r: r.kind != "published")
    return found[0] if found else None


def column(group: str, spec: str) -> str:
    """The key of one (group, LR kind) cell: ``"Set14|matlab+jpeg75"``, ``"art:manga|lanczos"``."""
    return f"{group}|{spec}"


def tables(rows: list[Row], groups: list[str], spec: str, reference: str) -> tuple[list[list[str]], list[list[str]]]:
    """One LR kind's table (rows x groups) and its difference to ``reference``."""
    cols = [column(g, spec) for g in groups]
    main = [[f"x{r.scale}", r.name, f"{r.params:,}" if r.params else "-"] + [cell(r.mean(c)) for c in cols]
            for r in rows]
    diff = []
    for r in rows:
        ref = reference_row(rows, r.scale, reference)
        if ref is None or r is ref:
            continue
        diff.append([f"x{r.scale}", r.name] + [delta_cell(r.mean(c), ref.mean(c)) for c in cols])
    return main, diff


def guard_report(rows: list[Row], groups: list[str], reference: str, tolerance: float,
                 names: list[str] | None = None) -> tuple[list[str], bool]:
    """Every ``--model`` row (or those whose file stem is in ``names``) against ``reference`` at its scale on
    clean LR, per group: (lines, all passed)."""
    lines, ok = [], True
    for r in rows:
        if r.kind != "model" or (names and (r.path is None or r.path.stem not in names)):
            continue
        ref = reference_row(rows, r.scale, reference)
        if ref is None:
            lines.append(f"guard x{r.scale} {r.name}: no {reference} row at x{r.scale} to compare with")
            ok = False
            continue
        cells, worst = [], math.inf
        for g in groups:
            mine, theirs = r.mean(column(g, CLEAN)), ref.mean(column(g, CLEAN))
            if mine is None or theirs is None:
                continue
            d = mine[0] - theirs[0]
            worst = min(worst, d)
            cells.append(f"{g} {d:+.3f}")
        passed = worst >= -tolerance
        ok &= passed
        lines.append(f"guard x{r.scale} {r.name} vs {ref.name} ({CLEAN} LR, dB): " + ", ".join(cells)
                     + f" -> {'PASS' if passed else 'FAIL'} (worst {worst:+.3f}, tolerance -{tolerance:g})")
    return lines, ok


def text_table(headers: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths))).rstrip()
              for b in body]
    return "\n".join(lines)


def markdown_table(headers: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(lines)




# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    summary, _, details = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=" ".join(summary.split()), epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", type=Path, default=[], metavar="FILE",
                   help="model files to evaluate, each at its own scale (anything archs.load_model reads)")
    p.add_argument("--scales", nargs="+", type=int, default=[2, 4], metavar="N",
                   help="scales of the published rows (default: 2 4); --model files add their own scale")
    p.add_argument("--weights", type=Path, default=SHARED / "weights",
                   help="folder of published checkpoints, all evaluated at their scale (default: %(default)s)")
    p.add_argument("--no-published", action="store_true", help="skip the checkpoints in --weights")
    p.add_argument("--peers", nargs="+", default=[], metavar="NAME",
                   help="classic upscalers through ncnn (bench/peers.py; 'all' = every one installed), each at its "
                   "scale when that is one of --scales")
    p.add_argument("--data-root", type=Path, default=SHARED / "data",
                   help="folder holding Set5/ and Set14/ (default: %(default)s)")
    p.add_argument("--sets", nargs="*", default=list(BENCH_SETS), metavar="NAME",
                   help="benchmark sets under --data-root (default: Set5 Set14; none: --sets with no name)")
    p.add_argument("--images", nargs="+", metavar="NAME", help="only these benchmark images (e.g. bird baboon)")
    p.add_argument("--lr", nargs="+", default=list(LR_SPECS), metavar="SPEC",
                   help="LR kinds, <downscale>[+jpeg<Q>] (default: %(default)s)")
    p.add_argument("--art", type=Path, metavar="DIR", help="held-out art HR images (png/jpg/webp, recursive)")
    p.add_argument("--art-max-images", type=int, default=0, metavar="N",
                   help="at most N art images, spread evenly over the sorted list (0 = all)")
    p.add_argument("--art-crop", type=int, default=0, metavar="PX", help="centre crop of each art image (0 = whole)")
    p.add_argument("--reference", default="EIMN_A", help="row the difference tables compare with (default: %(default)s)")
    p.add_argument("--guard", nargs="*", default=None, metavar="NAME", help="check --model rows (all, or those "
                   "whose file stem is named) against --reference on clean LR (Set5, Set14, each art kind); exit 3 "
                   "when one is worse by more than --guard-tolerance")
    p.add_argument("--guard-tolerance", type=float, default=0.05, metavar="DB", help="(default: %(default)s dB)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="device the models run on (default: %(default)s), always fp32")
    p.add_argument("--whole-max", type=int, default=1024, metavar="PX",
                   help="LR images up to PX² pixels run whole; larger ones tiled by nodes/engine.py (default: %(default)s)")
    p.add_argument("--tile", type=int, default=512, metavar="PX", help="engine tile size for large images (default: %(default)s)")
    p.add_argument("--per-image", action="store_true", help="also print every image's PSNR / SSIM")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the figures as JSON")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="write the tables as markdown")
    args = p.parse_args(argv)
    if any(s < 1 for s in args.scales):
        p.error(f"argument --scales: must be positive, got {args.scales}")
    if args.threads < 1 or args.whole_max < 1 or args.tile < 16 or args.art_crop < 0:
        p.error("--threads and --whole-max must be >= 1, --tile >= 16, --art-crop >= 0")
    for spec in args.lr:
        try:
            parse_lr_spec(spec)
        except ValueError as e:
            p.error(f"argument --lr: {e}")
    for name in args.sets:
        if not (args.data_root / name / "GTmod12").is_dir():
            p.error(f"no benchmark set {name} at {args.data_root / name} (GTmod12/ missing); see --data-root")
    if args.art is not None and not args.art.is_dir():
        p.error(f"--art {args.art} is not a folder")
    for path in args.model:
        if not path.is_file():
            p.error(f"--model {path} does not exist")
    if args.peers:
        peers = load_peers()
        known = list(peers.PEERS)
        if args.peers == ["all"]:
            found = peers.available_peers()
            args.peers = [n for n in known if not found[n]]
            if not args.peers:
                p.error("--peers all: no peer is installed (pip install -r bench/requirements-peers.txt)")
        for name in args.peers:
            if name not in known:
                p.error(f"argument --peers: unknown peer {name!r}; choose from {', '.join(known)} or 'all'")
    return args


def load_peers():
    """bench/peers.py (the ncnn peers), imported however this file was."""
    try:
        from bench import peers
    except ImportError:
        import peers  # type: ignore[no-redef]
    return peers


def build_rows(args) -> tuple[list[Row], list[int]]:
    models = [model_row(path, "model") for path in args.model]
    published = [] if args.no_published else [model_row(p, "published") for p in published_files(args.weights)]
    peer_rows = []
    if args.peers:
        peers = load_peers()
        for name in args.peers:
            spec = peers.PEERS[name]
            if spec.scale in args.scales:
                peer_rows.append(Row(name=name, scale=spec.scale, kind="peer", desc=peers.Peer(name, threads=args.threads)))
    scales = sorted(set(args.scales) | {r.scale for r in models})
    rows: list[Row] = []
    names: set[str] = set()
    for s in scales:
        at = [Row(name="bicubic", scale=s, kind="bicubic")]
        at += [r for r in published if r.scale == s and s in args.scales] + [r for r in models if r.scale == s]
        at += [r for r in peer_rows if r.scale == s]
        for r in at:
            if r.name in names and r.kind == "model":  # a given file named like a published one
                r.name = str(r.path)
            names.add(r.name)
        rows.extend(at)
    return rows, scales


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    start, load_start = time.perf_counter(), load_average()
    rows, scales = build_rows(args)
    runner = Runner(args.device, args.whole_max, args.tile)
    groups = list(args.sets)
    skipped: dict[str, int] = {}

    def evaluate(scale: int, cols: list[str], name: str, lr: torch.Tensor, hr: torch.Tensor) -> None:
        for row in (r for r in rows if r.scale == scale):
            t = time.process_time()
            sr = runner(row, lr)
            for c in cols:
                score(row, c, name, sr, hr)
            row.seconds += time.process_time() - t

    for scale in scales:
        for set_name in args.sets:
            for spec in args.lr:
                for name, lr, hr in bench_pairs(args.data_root / set_name, scale, spec, args.images):
                    evaluate(scale, [column(set_name, spec)], name, lr, hr)

    art_paths: list[Path] = []
    kinds: dict[str, int] = {}
    if args.art is not None:
        art_paths = pick_evenly(find_images(args.art), args.art_max_images)
        if not art_paths:
            raise SystemExit(f"error: no images under --art {args.art}")
        multiple = math.lcm(*scales)
        for path in art_paths:
            name = str(path.relative_to(args.art))
            try:
                hr, why = art_hr(path, args.art_crop, multiple)
            except Exception as e:  # noqa: BLE001 -- an unreadable file is counted, not fatal
                hr, why = None, "unreadable"
                print(f"skipped {name}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
            if hr is None:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            kind = art_kind(name)
            kinds[kind] = kinds.get(kind, 0) + 1
            for scale in scales:
                for spec in args.lr:
                    cols = [column("art", spec), column(f"art:{kind}", spec)]
                    evaluate(scale, cols, name, make_lr(hr, scale, spec), hr)
        order = list(KINDS) + ["other"]
        groups += ["art"] + [f"art:{k}" for k in sorted(kinds, key=order.index)]

    counts = {column(g, spec): max((len(r.scores.get(column(g, spec), [])) for r in rows), default=0)
              for g in groups for spec in args.lr}
    return {
        "rows": rows, "scales": scales, "groups": groups, "specs": list(args.lr), "counts": counts,
        "skipped": skipped, "kinds": kinds, "art_files": len(art_paths), "seconds": time.perf_counter() - start,
        "load_start": load_start, "load_end": load_average(), "tiled": runner.tiled,
    }


def report(args, result: dict) -> tuple[str, bool]:
    """The text report and whether the guard passed (True without --guard)."""
    rows, groups = result["rows"], result["groups"]
    first = result["specs"][0]
    out = ["Y-PSNR (dB) / SSIM: BT.601 Y, border = scale, output clipped and rounded to 8 bits, SSIM 11x11 sigma 1.5",
           "images per group: " + ", ".join(f"{g} {result['counts'][column(g, first)]}" for g in groups)]
    if args.art is not None:
        skipped = ", ".join(f"{n} {k}" for k, n in result["skipped"].items()) or "none"
        out.append(f"art: {result['art_files']} files from {args.art} (crop {args.art_crop or 'none'}, "
                   f"max {args.art_max_images or 'all'}; skipped: {skipped})")
    for spec in result["specs"]:
        main, diff = tables(rows, groups, spec, args.reference)
        out += ["", f"== LR: {spec}", text_table(["scale", "model", "params"] + groups, main)]
        if diff:
            out += [f"difference to {args.reference} at the same scale (PSNR dB / SSIM), LR {spec}",
                    text_table(["scale", "model"] + groups, diff)]
    passed = True
    if args.guard is not None:
        lines, passed = guard_report(rows, groups, args.reference, args.guard_tolerance, args.guard)
        out += [""] + (lines or ["guard: no --model row to check"])
    notes = []
    for r in rows:
        got = r.mean(column("Set5", CLEAN))
        for tag in r.tags:
            if (tag, r.scale) in PUBLISHED and got and not args.images:
                psnr, ssim = PUBLISHED[(tag, r.scale)]
                notes.append(f"authors' {tag} x{r.scale} on Set5: {psnr:.2f} / {ssim:.4f}; {r.name} here "
                             f"{got[0]:.4f} / {got[1]:.6f} ({got[0] - psnr:+.4f} dB)")
    if notes:
        out += [""] + notes
    if args.per_image:
        out.append("")
        for r in rows:
            for c, got in r.scores.items():
                for name, p, s in got:
                    out.append(f"  x{r.scale} {r.name} {c} {name}: {p:.3f} / {s:.4f}")
    cpu = ", ".join(f"{r.name} x{r.scale} {r.seconds:.1f} s" for r in rows)
    out += ["", f"{result['seconds']:.1f} s wall, {args.threads} thread(s), {args.device} fp32; "
                f"{result['tiled']} image runs tiled (LR > {args.whole_max}² px); CPU time: {cpu}",
            f"{result['load_start']} at start, {result['load_end']} at end; {cpu_info()}"]
    return "\n".join(out), passed


def to_json(args, result: dict) -> dict:
    return {
        "protocol": "Y-PSNR/SSIM, BT.601 Y, border = scale, output clipped to [0,1], x255, rounded; SSIM 11x11 sigma 1.5",
        "groups": result["groups"], "lr": result["specs"], "counts": result["counts"],
        "art": None if args.art is None else {"dir": str(args.art), "files": result["art_files"],
                                               "crop": args.art_crop, "max_images": args.art_max_images,
                                               "skipped": result["skipped"], "kinds": result["kinds"]},
        "reference": args.reference,
        "rows": [
            {"scale": r.scale, "model": r.name, "kind": r.kind, "path": str(r.path) if r.path else None,
             "params": r.params, "cpu_seconds": round(r.seconds, 2),
             "results": {c: {"psnr": m[0], "ssim": m[1], "n": len(r.scores[c]),
                             "per_image": {n: [p, s] for n, p, s in r.scores[c]}}
                         for c in r.scores if (m := r.mean(c)) is not None}}
            for r in result["rows"]
        ],
        "threads": args.threads, "device": args.device, "seconds": round(result["seconds"], 1),
        "load_average": {"start": result["load_start"], "end": result["load_end"]},
        "torch": torch.__version__, "cpu": cpu_info(),
    }


def to_markdown(args, result: dict) -> str:
    groups, first = result["groups"], result["specs"][0]
    text = ["Y-PSNR (dB) / SSIM (BT.601 Y, border = scale). Images per group: "
            + ", ".join(f"{g} {result['counts'][column(g, first)]}" for g in groups) + "."]
    for spec in result["specs"]:
        main, diff = tables(result["rows"], groups, spec, args.reference)
        text += ["", f"LR: `{spec}`", "", markdown_table(["scale", "model", "params"] + groups, main)]
        if diff:
            text += ["", f"Difference to {args.reference} at the same scale (PSNR dB / SSIM), LR `{spec}`:", "",
                     markdown_table(["scale", "model"] + groups, diff)]
    return "\n".join(text) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except FlexSRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text, passed = report(args, result)
    print(text)
    if args.json:
        write_atomic(args.json, json.dumps(to_json(args, result), indent=1) + "\n")
    if args.markdown:
        write_atomic(args.markdown, to_markdown(args, result))
    return 0 if passed else 3


if __name__ == "__main__":
    raise SystemExit(main())
