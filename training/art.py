"""Real drawn-art training data from Debian packages: clip art, painted art, wallpapers, lettering, manga pages.

    python -m training.art check              # which source packages are installed (and the apt-get line)
    python -m training.art build DIR          # DIR/{train,val,test}/*.png + DIR/manifest.jsonl

Every image comes from a file that a Debian package installs (``apt-get install`` by name), so the set
is licence-clean and rebuilt bit for bit from package names, versions and the seed:

- ``openclipart-svg``: public-domain clip art (flat fills, black outlines: close to cel-shaded art),
  rendered from SVG at the target size with a real renderer (``rsvg-convert``, else ``cairosvg``);
- ``wesnoth-1.16-data``: painted portraits and story art (GPL-2+);
- ``gnome-backgrounds``, ``plasma-workspace-wallpapers``, ``mate-backgrounds``, ``debian-edu-artwork``:
  wallpapers and artwork (CC-BY-SA / GPL / LGPL, per the packages' copyright files);
- installed font packages (``fonts-dejavu-core``, ``fonts-ipafont-*``, ``fonts-vlgothic``, ...):
  lettering, Latin and CJK, as in comics and manga;
- manga-style pages composed from the above: grey line art from clip art, screentone, panel borders and
  speech balloons with lettering.

Splits are decided per *source file* (a hash of package and path), so no source feeds two splits; a
composed page only uses sources and fonts of its own split. Each written image has one manifest line
(``split``, ``file``, ``kind``, ``package``, ``version``, ``licence``, ``copyright``, ``source``,
``size``); skipped files are counted with their reason in ``skipped.jsonl`` and ``summary.json``.
``summary.json`` also holds the manifest's SHA-256, which a trained model records.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import warnings
import contextlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from .data import to_rgb

SPLITS = ("train", "val", "test")
#: Fraction of source files per split (by hash; the rest is train).
SPLIT_FRACTIONS = {"test": 0.08, "val": 0.04}
RASTER_EXT = (".png", ".jpg", ".jpeg", ".webp")


class ArtBuildError(RuntimeError):
    """The art set cannot be built (no source installed, unwritable output, ...)."""


@dataclass(frozen=True)
class Source:
    """A Debian package whose files feed the set."""

    package: str
    kind: str  # one of KINDS
    roots: tuple[str, ...]
    licence: str
    extensions: tuple[str, ...] = RASTER_EXT
    limit_key: str = ""  # the build option capping how many files are taken (hash order)


SOURCES: tuple[Source, ...] = (
    Source("openclipart-svg", "clipart", ("usr/share/openclipart/svg",), "public domain (Open Clip Art Library)",
           (".svg",), "clipart"),
    Source("wesnoth-1.16-data", "painting", ("usr/share/games/wesnoth/1.16/data/core/images/portraits",
                                             "usr/share/games/wesnoth/1.16/data/core/images/story"),
           "GPL-2+ (Battle for Wesnoth art)", RASTER_EXT, "painting"),
    Source("gnome-backgrounds", "wallpaper", ("usr/share/backgrounds/gnome",), "CC-BY-SA-3.0 / CC-BY-SA-2.0 (per file)",
           RASTER_EXT + (".svg",), "wallpaper"),
    Source("plasma-workspace-wallpapers", "wallpaper", ("usr/share/wallpapers",), "LGPL-3 / CC-BY-SA (per file)",
           RASTER_EXT, "wallpaper"),
    Source("mate-backgrounds", "wallpaper", ("usr/share/backgrounds/mate",), "GPL-2+ / CC-BY-SA (per file)",
           RASTER_EXT, "wallpaper"),
    Source("debian-edu-artwork", "wallpaper", ("usr/share/desktop-base/debian-edu-emerald-theme",),
           "GPL-2+ (Debian Edu artwork)", RASTER_EXT + (".svg",), "wallpaper"),
    Source("flare-game", "painting", ("usr/share/games/flare/mods/fantasycore/images/portraits",
                                      "usr/share/games/flare/mods/empyrean_campaign/images/portraits",
                                      "usr/share/games/flare/mods/empyrean_campaign/images/cutscenes"),
           "CC-BY-SA-3.0+ (Flare art)", RASTER_EXT, "painting"),
    Source("hedgewars-data", "cartoon", ("usr/share/games/hedgewars/Data/Graphics/Missions",
                                         "usr/share/games/hedgewars/Data/Forts",
                                         "usr/share/games/hedgewars/Data/Themes"),
           "GPL-2 / CC (Hedgewars art, per file)", RASTER_EXT, "cartoon"),
    Source("supertux-data", "cartoon", ("usr/share/games/supertux2/images/background",),
           "GPL-2+ / CC-BY-SA (SuperTux art, per file)", RASTER_EXT, "cartoon"),
    Source("tuxpaint-data", "clipart", ("usr/share/tuxpaint/starters",), "GPL-2+ (Tux Paint colouring pages)",
           RASTER_EXT + (".svg",), "clipart"),
)
#: What each kind of image is (the evaluation reports every kind on its own).
KINDS = {"clipart": "clip art and colouring pages (flat fills, outlines)", "painting": "painted portraits and story art",
         "cartoon": "cartoon game art (backgrounds, scenes)", "wallpaper": "wallpapers and artwork",
         "lettering": "lettering, Latin and CJK", "manga": "composed grey manga-style pages"}
#: Font packages: Latin and CJK lettering (any installed font under these folders is used).
FONT_PACKAGES = ("fonts-dejavu-core", "fonts-ipafont-gothic", "fonts-ipafont-mincho", "fonts-vlgothic")
FONT_ROOTS = ("usr/share/fonts",)
FONT_EXT = (".ttf", ".otf", ".ttc")
CJK_PROBE = "漢字かなカナ"


@dataclass
class BuildOptions:
    root: Path = Path("/")
    seed: int = 0
    size: int = 768  # longest side of written images (clip art is rendered at it; larger rasters are downscaled)
    min_size: int = 128  # smaller sources are skipped ("tiny")
    max_pixels: int = 60_000_000  # larger sources are skipped ("huge"), also a decompression-bomb guard
    max_bytes: int = 80 << 20
    clipart: int = 1200
    painting: int = 400
    wallpaper: int = 400
    cartoon: int = 400
    lettering: int = 120
    manga: int = 120
    workers: int = 2
    render_timeout: float = 30.0
    renderer: str = "auto"


@dataclass
class Candidate:
    source: Source
    path: Path  # absolute path on the (possibly fake) root
    rel: str  # path relative to the root, as recorded
    split: str


@dataclass
class BuildResult:
    out: Path
    records: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- packages
def package_version(package: str) -> str | None:
    """The installed Debian version of ``package`` (None when not installed or no dpkg)."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or "\t" not in out.stdout:
        return None
    status, version = out.stdout.split("\t", 1)
    return version.strip() if status.endswith("installed") and not status.endswith("not-installed") else None


def check_packages(root: Path = Path("/")) -> dict[str, str | None]:
    """Each source and font package -> installed version (or ``"files present"`` under a fake root; None = missing)."""
    found: dict[str, str | None] = {}
    for pkg, roots in [(s.package, s.roots) for s in SOURCES] + [(p, FONT_ROOTS) for p in FONT_PACKAGES]:
        version = package_version(pkg) if Path(root) == Path("/") else None
        if version is None and Path(root) != Path("/"):
            version = "files present" if any((Path(root) / r).exists() for r in roots) else None
        found[pkg] = version
    return found


def apt_line(missing: list[str]) -> str:
    renderer = [] if shutil.which("rsvg-convert") else ["librsvg2-bin"]
    return "apt-get update && apt-get install -y " + " ".join(sorted(set(missing + renderer)))


# ------------------------------------------------------------------------------------------------- splits
def split_of(key: str, seed: int) -> str:
    """Deterministic split of one source file (same key and seed -> same split, on any machine)."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
    if u < SPLIT_FRACTIONS["test"]:
        return "test"
    if u < SPLIT_FRACTIONS["test"] + SPLIT_FRACTIONS["val"]:
        return "val"
    return "train"


def group_key(rel: str) -> str:
    """Files that show the same picture share a key, hence a split: ``Name/contents/images/WxH.ext`` (KDE
    wallpapers in several resolutions) -> ``Name``; ``name-l`` / ``name-d`` (light and dark variants) -> ``name``."""
    parts = rel.split("/")
    if "contents" in parts:
        return "/".join(parts[: parts.index("contents")])
    stem = re.sub(r"[-_](l|d|day|night|dark|light|morning|evening)$", "", parts[-1].rsplit(".", 1)[0], flags=re.I)
    return "/".join(parts[:-1] + [stem])


def _hash_order(items, seed: int, key=lambda x: x):
    return sorted(items, key=lambda x: hashlib.sha256(f"{seed}|{key(x)}".encode()).hexdigest())


def find_candidates(source: Source, opts: BuildOptions) -> list[Candidate]:
    root = Path(opts.root)
    files: list[Path] = []
    for r in source.roots:
        base = root / r
        if base.is_dir():
            for dirpath, _dirs, names in os.walk(base, followlinks=False):
                files += [Path(dirpath) / n for n in names if n.lower().endswith(source.extensions)]
    groups: dict[str, Path] = {}
    seen: set[Path] = set()
    for p in sorted(files):
        real = p.resolve()
        if real in seen or p.stem.lower() == "screenshot":  # the same file through a link; previews
            continue
        seen.add(real)
        key = group_key(str(p.relative_to(root)))
        # one file per group (a wallpaper in several resolutions or light/dark variants): the largest
        if key not in groups or p.stat().st_size > groups[key].stat().st_size:
            groups[key] = p
    out = []
    for key, p in sorted(groups.items()):
        rel = str(p.relative_to(root))
        out.append(Candidate(source, p, rel, split_of(f"{source.package}/{key}", opts.seed)))
    limit = getattr(opts, source.limit_key, 0) if source.limit_key else 0
    if limit and len(out) > limit:
        out = _hash_order(out, opts.seed, key=lambda c: c.rel)[:limit]
    return out


def find_fonts(opts: BuildOptions) -> dict[str, list[tuple[Path, bool]]]:
    """Fonts per split: (path, renders CJK). Each script gets at least one font in test and val when it has 3+."""
    root = Path(opts.root)
    fonts: dict[Path, Path] = {}
    for r in FONT_ROOTS:
        base = root / r
        if base.is_dir():
            for dirpath, _dirs, names in os.walk(base):
                for n in names:
                    if n.lower().endswith(FONT_EXT):
                        p = Path(dirpath) / n
                        fonts.setdefault(p.resolve(), p)
    usable = []
    for real, p in sorted(fonts.items()):
        try:
            font = ImageFont.truetype(str(real), 24)
            cjk = _renders(font, CJK_PROBE)
            if not _renders(font, "Ag") and not cjk:
                continue
        except (OSError, ValueError):
            continue
        usable.append((p, cjk))
    per_split: dict[str, list[tuple[Path, bool]]] = {s: [] for s in SPLITS}
    for cjk in (False, True):
        group = _hash_order([f for f in usable if f[1] == cjk], opts.seed, key=lambda f: str(f[0].relative_to(root)))
        for i, f in enumerate(group):
            if len(group) >= 3 and i < 2:
                split = ("test", "val")[i]
            else:
                split = split_of(f"font/{f[0].relative_to(root)}", opts.seed)
            per_split[split].append(f)
    return per_split


def _renders(font, text: str) -> bool:
    """Whether the font has real glyphs for ``text`` (not the same .notdef box for every character)."""
    masks = []
    for ch in text:
        try:
            m = font.getmask(ch)
        except Exception:  # noqa: BLE001
            return False
        if m.size[0] == 0 or m.size[1] == 0:
            return False
        masks.append(bytes(m))
    return len(set(masks)) == len(masks)


# -------------------------------------------------------------------------------------------- image reads
class SkipImage(Exception):
    """A source file that is not used; the message is the reason."""


def _render_svg(path: Path, size: int, opts: BuildOptions) -> Image.Image:
    renderer = opts.renderer
    if renderer == "auto":
        renderer = "rsvg-convert" if shutil.which("rsvg-convert") else "cairosvg"
    if renderer == "rsvg-convert":
        try:
            out = subprocess.run(["rsvg-convert", "-a", "-w", str(size), "-h", str(size), "-f", "png", str(path)],
                                 capture_output=True, timeout=opts.render_timeout)
        except subprocess.TimeoutExpired as e:
            raise SkipImage("render timeout") from e
        if out.returncode != 0 or not out.stdout:
            lines = out.stderr.decode(errors="replace").strip().splitlines()
            raise SkipImage("broken svg" + (f": {lines[-1][:120]}" if lines else ""))
        data = out.stdout
    else:
        try:
            import cairosvg
        except ImportError as e:
            raise ArtBuildError("no SVG renderer: install librsvg2-bin (rsvg-convert) or pip install cairosvg") from e
        try:
            data = cairosvg.svg2png(url=str(path), output_width=size, output_height=size)
        except Exception as e:  # noqa: BLE001 - any parse or render failure skips the file
            raise SkipImage(f"broken svg: {type(e).__name__}") from e
        # cairosvg stretches to the box: render once at natural size to keep the aspect ratio
        with Image.open(io.BytesIO(cairosvg.svg2png(url=str(path)))) as nat:
            w, h = nat.size
        if w and h:
            k = size / max(w, h)
            data = cairosvg.svg2png(url=str(path), output_width=max(1, round(w * k)), output_height=max(1, round(h * k)))
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001
        raise SkipImage("renderer gave no image") from e
    return img


def _open_raster(path: Path, opts: BuildOptions) -> Image.Image:
    if path.stat().st_size > opts.max_bytes:
        raise SkipImage("huge file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            if img.size[0] * img.size[1] > opts.max_pixels:
                raise SkipImage(f"huge image {img.size[0]}x{img.size[1]}")
            img.load()
    except SkipImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipImage("huge image") from e
    except Exception as e:  # noqa: BLE001 - broken or unsupported file
        raise SkipImage(f"unreadable: {type(e).__name__}") from e
    return img


def _content_crop(img: Image.Image, margin: int = 8) -> Image.Image:
    """Crop to the non-white content plus a margin (rendered clip art sits in empty canvases)."""
    arr = np.asarray(img.convert("L"))
    ys, xs = np.nonzero(arr < 250)
    if len(ys) == 0:
        raise SkipImage("blank")
    y0, y1 = max(0, ys.min() - margin), min(arr.shape[0], ys.max() + 1 + margin)
    x0, x1 = max(0, xs.min() - margin), min(arr.shape[1], xs.max() + 1 + margin)
    return img.crop((x0, y0, x1, y1))


def _fit(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if max(w, h) <= size:
        return img
    k = size / max(w, h)
    return img.resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.LANCZOS, reducing_gap=3.0)


def load_source(c: Candidate, opts: BuildOptions) -> Image.Image:
    """The HR image of one source file (RGB, longest side <= opts.size) or SkipImage with the reason."""
    if c.path.suffix.lower() == ".svg":
        if c.path.stat().st_size > opts.max_bytes:
            raise SkipImage("huge file")
        img = to_rgb(_render_svg(c.path, opts.size, opts))
        if c.source.kind == "clipart":
            img = _content_crop(img)
    else:
        img = _fit(to_rgb(_open_raster(c.path, opts)), opts.size)
    if min(img.size) < opts.min_size:
        raise SkipImage(f"tiny {img.size[0]}x{img.size[1]}")
    if float(np.asarray(img.convert("L"), dtype=np.float32).std()) < 2.0:
        raise SkipImage("flat (no detail)")
    return img


# ------------------------------------------------------------------------------------- lettering and manga
KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをんアイウエオカキクケコサシスセソタチツテトナニヌネノハヒフヘホマミムメモヤユヨラリルレロワヲン"
KANJI = "日本語漫画絵描線影光夢空海山川花月星風雨雪火水木金土人心手目口耳足力気天地時間前後上下左右中大小"
LATIN_WORDS = ("the", "night", "WHAT", "is", "this", "sword", "never", "again", "BOOM", "hey", "wait", "dragon",
               "city", "lights", "we", "can't", "stop", "now", "!?", "...", "SLAM", "run", "forest", "star", "Mika")


def _text(rng: random.Random, cjk: bool) -> str:
    if cjk:
        return "".join(rng.choice(KANA if rng.random() < 0.7 else KANJI) for _ in range(rng.randint(2, 8)))
    return " ".join(rng.choice(LATIN_WORDS) for _ in range(rng.randint(1, 4)))


def make_lettering(rng: random.Random, fonts: list[tuple[Path, bool]], size: int) -> Image.Image:
    """A page of lettering: lines of Latin or CJK text in several sizes, colours and outlines."""
    w, h = size, int(size * rng.uniform(0.6, 1.0))
    bg = tuple(rng.randint(200, 255) for _ in range(3)) if rng.random() < 0.5 else (255, 255, 255)
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    y = rng.randint(4, 20)
    while y < h - 20:
        path, cjk = rng.choice(fonts)
        px = rng.choice((12, 14, 16, 20, 24, 32, 40, 56))
        font = ImageFont.truetype(str(path), px)
        ink = tuple(rng.randint(0, 90) for _ in range(3)) if rng.random() < 0.8 else tuple(rng.randint(0, 255) for _ in range(3))
        stroke = rng.choice((0, 0, 0, 1, 2))
        d.text((rng.randint(4, max(5, w // 4)), y), _text(rng, cjk), font=font, fill=ink, stroke_width=stroke,
               stroke_fill=(255, 255, 255) if stroke else None)
        y += int(px * rng.uniform(1.2, 1.8))
    return img


def screentone(shape: tuple[int, int], level: float, pitch: float, angle: float) -> np.ndarray:
    """A halftone dot pattern (0 ink .. 1 paper) of mean grey ``level``, dot pitch in pixels, rotated ``angle``."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = math.radians(angle)
    u = (xx * math.cos(a) + yy * math.sin(a)) / pitch
    v = (-xx * math.sin(a) + yy * math.cos(a)) / pitch
    dist = np.hypot(u - np.round(u), v - np.round(v))  # 0 at dot centres, up to ~0.707
    radius = math.sqrt(max(0.0, 1.0 - level) / math.pi)  # ink area fraction -> dot radius in pitch units
    edge = 0.6 / pitch  # ~1 px antialiased edge
    return np.clip((dist - radius) / edge + 0.5, 0.0, 1.0)


def _manga_panel(art: Image.Image | Path, box: tuple[int, int], rng: random.Random) -> np.ndarray:
    """One panel: clip art (an image, or the file of one) as grey line art with flat tones replaced by screentone."""
    bw, bh = box
    if not isinstance(art, Image.Image):
        with Image.open(art) as im:
            art = im.convert("RGB")
    a = ImageOps.autocontrast(ImageOps.contain(art.convert("L"), (bw, bh), Image.Resampling.LANCZOS), cutoff=1)
    canvas = Image.new("L", (bw, bh), 255)
    canvas.paste(a, ((bw - a.size[0]) // 2, (bh - a.size[1]) // 2))
    g = np.asarray(canvas, dtype=np.float32) / 255.0
    # flat mid-tone areas become screentone; lines and their antialiased edges stay as drawn
    spread = np.asarray(canvas.filter(ImageFilter.MaxFilter(5)), np.float32) - np.asarray(
        canvas.filter(ImageFilter.MinFilter(5)), np.float32)
    flat_mid = (g > 0.3) & (g < 0.9) & (spread < 12)
    out = g.copy()
    if flat_mid.any():
        pitch, angle = rng.uniform(3.0, 7.0), rng.choice((45.0, 30.0, 0.0, 15.0))
        tone = screentone(g.shape, float(np.mean(g[flat_mid])), pitch, angle)
        out[flat_mid] = tone[flat_mid]
    if rng.random() < 0.5:  # a light tone over the paper behind the figure (sky, wall)
        paper = (g >= 0.9) & (np.asarray(canvas.filter(ImageFilter.MinFilter(5)), np.float32) >= 230)
        tone = screentone(g.shape, rng.uniform(0.75, 0.92), rng.uniform(3.0, 6.0), rng.choice((45.0, 0.0)))
        band = np.arange(bh)[:, None] < int(bh * rng.uniform(0.3, 1.0))
        sel = paper & band
        out[sel] = tone[sel]
    return out


def make_manga_page(rng: random.Random, arts: list[Image.Image | Path], fonts: list[tuple[Path, bool]], size: int) -> Image.Image:
    """A grey manga-style page: panels of line art and screentone, borders, balloons with lettering."""
    h = size
    w = int(size * 0.7)
    page = np.ones((h, w), np.float32)
    margin, gutter = int(w * 0.05), rng.randint(6, 14)
    rows = rng.randint(2, 3)
    y = margin
    row_h = (h - 2 * margin - gutter * (rows - 1)) // rows
    boxes = []
    for _ in range(rows):
        cols = rng.randint(1, 2)
        split = rng.uniform(0.35, 0.65) if cols == 2 else 1.0
        x = margin
        inner = w - 2 * margin - gutter * (cols - 1)
        widths = [int(inner * split), inner - int(inner * split)] if cols == 2 else [inner]
        for cw in widths:
            boxes.append((x, y, cw, row_h))
            x += cw + gutter
        y += row_h + gutter
    for (x, y, bw, bh) in boxes:
        page[y:y + bh, x:x + bw] = _manga_panel(rng.choice(arts), (bw, bh), rng)
    img = Image.fromarray((page * 255 + 0.5).astype(np.uint8), "L").convert("RGB")
    d = ImageDraw.Draw(img)
    for (x, y, bw, bh) in boxes:
        d.rectangle((x, y, x + bw - 1, y + bh - 1), outline=(0, 0, 0), width=rng.choice((2, 3, 4)))
        if fonts and rng.random() < 0.8:
            path, cjk = rng.choice(fonts)
            px = rng.choice((14, 16, 18, 22))
            font = ImageFont.truetype(str(path), px)
            text = _text(rng, cjk)
            vertical = cjk and rng.random() < 0.7
            if vertical:
                tw, th = px + 4, (px + 2) * len(text)
            else:
                tw, th = int(font.getlength(text)) + 4, px + 4
            ew, eh = tw + 2 * px, th + px
            if ew >= bw - 8 or eh >= bh - 8:
                continue
            ex, ey = x + rng.randint(4, bw - ew - 4), y + rng.randint(4, bh - eh - 4)
            d.ellipse((ex, ey, ex + ew, ey + eh), fill=(255, 255, 255), outline=(0, 0, 0), width=2)
            if vertical:
                for i, ch in enumerate(text):
                    d.text((ex + (ew - px) // 2, ey + px // 2 + i * (px + 2)), ch, font=font, fill=(0, 0, 0))
            else:
                d.text((ex + px, ey + px // 2), text, font=font, fill=(0, 0, 0))
    return img


# --------------------------------------------------------------------------------------------------- build
def _load_worker(args) -> tuple[int, bytes | None, str | None, tuple[int, int] | None]:
    i, c, opts = args
    try:
        img = load_source(c, opts)
    except SkipImage as e:
        return i, None, str(e), None
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return i, buf.getvalue(), None, img.size


def _copyright(package: str) -> str:
    return str(Path("/usr/share/doc") / package / "copyright")


def _bar(progress: bool, total: int, desc: str, unit: str):
    """A tqdm bar on stderr (files done, kept/skipped counts, rate, ETA); a silent stand-in when ``progress`` is off."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, file=sys.stderr, mininterval=2.0,
                dynamic_ncols=True)


def build(out: str | Path, opts: BuildOptions | None = None, log=print, progress: bool = True) -> BuildResult:
    """Build the art set under ``out`` (must not exist or be empty); returns the records and skip counts.

    ``progress`` shows tqdm bars on stderr. Memory stays bounded: each source image is written as it arrives,
    and the manga pages open the clip art of their panels from the written files.
    """
    opts = opts or BuildOptions()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtBuildError(f"{out} exists and is not an empty folder; choose a new one")
    versions = check_packages(opts.root)
    missing = [p for p, v in versions.items() if v is None]
    if missing:
        log(f"missing source packages (their images are left out): {', '.join(missing)}\n  {apt_line(missing)}")
    cands: list[Candidate] = []
    for s in SOURCES:
        if versions.get(s.package):
            cands += find_candidates(s, opts)
    fonts = find_fonts(opts)
    if not cands and not any(fonts.values()):
        raise ArtBuildError("no source package is installed: " + apt_line(missing))

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    for s in SPLITS:
        (tmp / s).mkdir(parents=True)
    res = BuildResult(out)
    loaded: dict[str, list[Path]] = {s: [] for s in SPLITS}  # the written clip art files, for manga pages

    def version_of(package: str) -> str:
        if package not in versions:  # a font package found on disk but not in FONT_PACKAGES
            versions[package] = package_version(package) if Path(opts.root) == Path("/") else "files present"
        return versions[package] or "unknown"

    def record(split: str, img: Image.Image, name: str, kind: str, packages: list[str], licence: str, source: str,
               data=None):
        path = tmp / split / name
        if data is None:
            img.save(path, format="PNG", compress_level=6)
        else:
            path.write_bytes(data)
        res.records.append({"split": split, "file": f"{split}/{name}", "kind": kind, "package": ",".join(packages),
                            "version": ",".join(version_of(p) for p in packages), "licence": licence,
                            "copyright": ",".join(_copyright(p) for p in packages), "source": source,
                            "size": [img.size[0], img.size[1]],
                            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                            "pixels_sha256": pixels_sha256(img)})

    jobs = [(i, c, opts) for i, c in enumerate(cands)]
    log(f"rendering/reading {len(jobs)} source files with {opts.workers} workers ...")
    bar = _bar(progress, len(jobs), "source files", "file")
    with contextlib.ExitStack() as stack:
        if opts.workers > 1 and len(jobs) > 1:
            ex = stack.enter_context(ProcessPoolExecutor(opts.workers))
            results = ex.map(_load_worker, jobs, chunksize=4)  # in order, one image at a time in this process
        else:
            results = map(_load_worker, jobs)
        for i, data, reason, size in results:
            c = cands[i]
            bar.update(1)
            if data is None:
                res.skipped.append({"package": c.source.package, "source": "/" + c.rel, "reason": reason})
                bar.set_postfix(kept=len(res.records), skipped=len(res.skipped), refresh=False)
                continue
            img = Image.open(io.BytesIO(data))
            img.load()
            stem = hashlib.sha256(c.rel.encode()).hexdigest()[:12]
            name = f"{c.source.kind}_{Path(c.rel).stem[:40]}_{stem}.png".replace(" ", "_")
            record(c.split, img, name, c.source.kind, [c.source.package], c.source.licence, "/" + c.rel, data)
            if c.source.kind == "clipart" and c.source.package == "openclipart-svg":
                loaded[c.split].append(tmp / c.split / name)  # a page opens its panels' art when it needs them
            bar.set_postfix(kept=len(res.records), skipped=len(res.skipped), refresh=False)
    bar.close()

    font_pkg = {p: _font_package(p) for s in SPLITS for p, _ in fonts[s]}
    share_of = {"train": 1.0 - sum(SPLIT_FRACTIONS.values()), **SPLIT_FRACTIONS}
    n_pages = sum(max(1, round(n * share_of[s])) for s in SPLITS
                  for n, has in ((opts.lettering, bool(fonts[s])), (opts.manga, bool(loaded[s]))) if has)
    bar = _bar(progress, n_pages, "lettering and manga pages", "page")
    for split in SPLITS:
        share = share_of[split]
        if fonts[split]:
            for k in range(max(1, round(opts.lettering * share))):
                bar.update(1)
                rng = random.Random(f"{opts.seed}:lettering:{split}:{k}")
                img = make_lettering(rng, fonts[split], min(opts.size, 640))
                used = sorted({str(p) for p, _ in fonts[split]})
                record(split, img, f"lettering_{k:04d}.png", "lettering", sorted({font_pkg[Path(u)] for u in used}),
                       "font licences (OFL / GPL / IPA, per package)", "generated from " + ";".join(used))
        if loaded[split]:
            for k in range(max(1, round(opts.manga * share))):
                bar.update(1)
                rng = random.Random(f"{opts.seed}:manga:{split}:{k}")
                img = make_manga_page(rng, loaded[split], fonts[split], opts.size)
                record(split, img, f"manga_{k:04d}.png", "manga", ["openclipart-svg", *sorted(
                    {font_pkg[p] for p, _ in fonts[split]})], "public domain clip art + font licences",
                    f"composed from {split} clip art and fonts (seed {opts.seed}, page {k})")

    bar.close()
    manifest = "".join(json.dumps(r, sort_keys=True) + "\n" for r in res.records)
    (tmp / "manifest.jsonl").write_text(manifest)
    (tmp / "skipped.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in res.skipped))
    reasons: dict[str, int] = {}
    for r in res.skipped:
        key = r["reason"].split(":")[0].split(" ")[0] if not r["reason"].startswith(("tiny", "huge")) else r["reason"].split(" ")[0]
        reasons[key] = reasons.get(key, 0) + 1
    counts = {s: sum(r["split"] == s for r in res.records) for s in SPLITS}
    kinds = {}
    for r in res.records:
        kinds.setdefault(r["kind"], {s: 0 for s in SPLITS})[r["split"]] += 1
    res.summary = {
        "manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest(),
        "pixels_sha256": data_pixels_sha256(res.records),
        "images": counts, "kinds": kinds, "skipped": len(res.skipped), "skipped_by_reason": reasons,
        "packages": {p: v for p, v in versions.items()}, "seed": opts.seed,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "command": "python -m training.art build " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["build"] else None,
    }
    (tmp / "summary.json").write_text(json.dumps(res.summary, indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return res


def pixels_sha256(img: Image.Image) -> str:
    """SHA-256 of an image's decoded pixels (mode, size, raw bytes): unlike the file's hash, it does not
    change with the PNG encoder (pillow or zlib version) that wrote the file."""
    return hashlib.sha256(f"{img.mode} {img.size[0]}x{img.size[1]}\n".encode() + img.tobytes()).hexdigest()


def data_pixels_sha256(records) -> str:
    """One hash of a data set's content: file names and their pixel hashes, in file-name order. Two builds
    with the same packages, seed and options give the same value on any machine whose renderer draws the
    same pixels, whatever PNG encoder wrote the files."""
    lines = sorted(f"{r['file']} {r['pixels_sha256']}\n" for r in records)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _font_package(path: Path) -> str:
    p = str(path)
    for name, needle in (("fonts-ipafont-gothic", "ipafont-gothic"), ("fonts-ipafont-mincho", "ipafont-mincho"),
                         ("fonts-vlgothic", "vlgothic"), ("fonts-dejavu-core", "dejavu"), ("fonts-droid-fallback", "droid"),
                         ("fonts-liberation", "liberation"), ("fonts-noto", "noto"), ("fonts-lato", "lato")):
        if needle in p.lower():
            return name
    return "font:" + path.parent.name


# ----------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.art", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="list the source packages and print the apt-get line for missing ones")
    b = sub.add_parser("build", help="build DIR/{train,val,test} and DIR/manifest.jsonl")
    b.add_argument("out", metavar="DIR")
    d = BuildOptions()
    b.add_argument("--root", default="/", help="file-system root the packages are read from (tests use a fake tree)")
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument("--size", type=int, default=d.size, help="longest side of written images")
    for k in ("clipart", "painting", "wallpaper", "cartoon", "lettering", "manga"):
        b.add_argument(f"--{k}", type=int, default=getattr(d, k), metavar="N", help=f"at most N {k} images (0 = all)"
                       if k in ("clipart", "painting", "wallpaper", "cartoon") else f"{k} pages over all splits")
    b.add_argument("--workers", type=int, default=d.workers)
    b.add_argument("--renderer", choices=("auto", "rsvg-convert", "cairosvg"), default="auto")
    args = ap.parse_args(argv)
    if args.cmd == "check":
        versions = check_packages()
        for p, v in versions.items():
            print(f"{p:32s} {v or 'MISSING'}")
        missing = [p for p, v in versions.items() if v is None]
        print(apt_line(missing) if missing or not shutil.which("rsvg-convert") else "all source packages installed")
        return 0
    if args.size < 64 or args.workers < 1:
        ap.error("--size must be >= 64 and --workers >= 1")
    opts = BuildOptions(root=Path(args.root), seed=args.seed, size=args.size, workers=args.workers,
                        renderer=args.renderer, **{k: getattr(args, k) for k in
                                                   ("clipart", "painting", "wallpaper", "cartoon", "lettering", "manga")})
    try:
        res = build(args.out, opts)
    except ArtBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = res.summary
    print(json.dumps({k: s[k] for k in ("images", "kinds", "skipped", "skipped_by_reason", "manifest_sha256")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
