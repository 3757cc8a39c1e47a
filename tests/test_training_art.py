"""The drawn-art builder (training/art.py) on a small fake package tree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import art

SYSTEM_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")

SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">
<rect width="{w}" height="{h}" fill="white"/>
<circle cx="{cx}" cy="{cy}" r="{r}" fill="#{fill}" stroke="black" stroke-width="3"/>
<path d="M 5 5 L {w2} {h2}" stroke="black" stroke-width="2"/></svg>"""


def _svg(path: Path, i: int, w: int = 120, h: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SVG.format(w=w, h=h, cx=w // 2, cy=h // 2, r=min(w, h) // 3, fill=f"{(i * 47) % 256:02x}8040",
                               w2=w - 5, h2=h - 5))


def _png(path: Path, size: tuple[int, int], seed: int, fmt: str = "PNG", mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1] // 8 + 1, size[0] // 8 + 1, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC)
    img.convert(mode).save(path, format=fmt)


@pytest.fixture()
def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    clip = root / "usr/share/openclipart/svg"
    for i in range(14):
        _svg(clip / f"cat{i % 3}" / f"art_{i:02d}.svg", i, w=200 + 10 * i, h=150)
    (clip / "broken.svg").write_text("<svg this is not xml")
    _svg(clip / "huge.svg", 99)
    (clip / "huge.svg").write_bytes((clip / "huge.svg").read_bytes() + b"<!--" + b"x" * 1_500_000 + b"-->")
    gnome = root / "usr/share/backgrounds/gnome"
    _png(gnome / "dunes-l.png", (400, 300), 1)
    _png(gnome / "dunes-d.png", (400, 300), 2)  # dark variant of the same picture: one group
    _png(gnome / "photo.jpg", (420, 280), 3, fmt="JPEG")
    _png(gnome / "tiny.png", (40, 30), 4)
    _png(gnome / "oversized.png", (700, 700), 5)
    _png(gnome / "alpha.png", (300, 300), 6, mode="RGBA")
    (gnome / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    kde = root / "usr/share/wallpapers/Hills/contents"
    _png(kde / "images/1920x1080.png", (480, 270), 7)
    _png(kde / "images/800x600.png", (200, 150), 7)
    _png(kde / "screenshot.png", (200, 150), 8)
    wes = root / "usr/share/games/wesnoth/1.16/data/core/images/portraits/humans"
    _png(wes / "knight.png", (256, 256), 9, mode="RGBA")
    if SYSTEM_FONT.exists():
        fonts = root / "usr/share/fonts/truetype/dejavu"
        fonts.mkdir(parents=True)
        shutil.copy(SYSTEM_FONT, fonts / SYSTEM_FONT.name)
    return root


def _opts(root: Path, **kw) -> art.BuildOptions:
    base = dict(root=root, size=256, min_size=64, max_pixels=400 * 400, max_bytes=1_000_000, clipart=0, painting=0,
                wallpaper=0, lettering=6, manga=6, workers=1)
    base.update(kw)
    return art.BuildOptions(**base)


def test_build_writes_manifest_splits_and_skip_reasons(fake_root: Path, tmp_path: Path):
    res = art.build(tmp_path / "set", _opts(fake_root), log=lambda *a: None)
    out = tmp_path / "set"
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert lines == res.records and len(lines) > 10
    for r in lines:
        f = out / r["file"]
        assert f.is_file() and r["split"] in art.SPLITS and f.parent.name == r["split"]
        with Image.open(f) as im:
            assert im.mode == "RGB" and list(im.size) == r["size"] and max(im.size) <= 256
        for key in ("package", "version", "licence", "copyright", "source", "sha256", "kind"):
            assert r[key], (key, r)
    # every image file on disk is in the manifest
    assert sorted(str(p.relative_to(out)) for p in out.glob("*/*.png")) == sorted(r["file"] for r in lines)

    # disjoint by source file: one record per source, and variants of one picture share a split
    sources = [r["source"] for r in lines if r["kind"] not in ("lettering", "manga")]
    assert len(sources) == len(set(sources))
    assert sum("dunes" in s for s in sources) == 1  # light/dark variants: the larger one only
    assert sum("Hills" in s for s in sources) == 1 and not any("screenshot" in s for s in sources)
    assert any(s.endswith("1920x1080.png") for s in sources)

    skipped = {Path(s["source"]).name: s["reason"] for s in res.skipped}
    assert skipped["broken.svg"].startswith("broken svg")
    assert skipped["huge.svg"] == "huge file"
    assert skipped["tiny.png"].startswith("tiny")
    assert skipped["oversized.png"].startswith("huge image")
    assert skipped["corrupt.png"].startswith("unreadable")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == len(res.skipped) == len((out / "skipped.jsonl").read_text().splitlines())
    assert sum(summary["images"].values()) == len(lines)
    assert summary["packages"]["openclipart-svg"] == "files present"
    assert summary["packages"]["mate-backgrounds"] is None  # not in the fake tree: reported missing
    # composed pages only use their own split's sources
    for r in lines:
        if r["kind"] == "manga":
            assert r["split"] in r["source"]


def test_alpha_is_composited_on_white_and_clip_art_cropped(fake_root: Path, tmp_path: Path):
    res = art.build(tmp_path / "set", _opts(fake_root, lettering=0, manga=0), log=lambda *a: None)
    by_name = {Path(r["source"]).name: r for r in res.records}
    knight = np.asarray(Image.open(tmp_path / "set" / by_name["knight.png"]["file"]))
    assert knight.shape == (256, 256, 3)
    clip = by_name["art_00.svg"]
    # rendered at size 256 on the longest side, then cropped to the drawing plus a margin: still the circle
    assert max(clip["size"]) <= 256 and min(clip["size"]) >= 64


def test_build_is_deterministic_and_splits_depend_only_on_names(fake_root: Path, tmp_path: Path):
    a = art.build(tmp_path / "a", _opts(fake_root), log=lambda *a: None)
    b = art.build(tmp_path / "b", _opts(fake_root), log=lambda *a: None)
    assert a.summary["manifest_sha256"] == b.summary["manifest_sha256"]
    assert (tmp_path / "a/manifest.jsonl").read_bytes() == (tmp_path / "b/manifest.jsonl").read_bytes()
    assert a.summary["pixels_sha256"] == b.summary["pixels_sha256"]
    # the split of a file is a function of its package and path alone
    assert art.split_of("openclipart-svg/x.svg", 0) == art.split_of("openclipart-svg/x.svg", 0)
    draws = [art.split_of(f"pkg/file_{i}.svg", 0) for i in range(4000)]
    share = {s: draws.count(s) / len(draws) for s in art.SPLITS}
    assert abs(share["test"] - art.SPLIT_FRACTIONS["test"]) < 0.02
    assert abs(share["val"] - art.SPLIT_FRACTIONS["val"]) < 0.015


def test_group_key_ties_variants_of_one_picture():
    assert art.group_key("usr/share/wallpapers/Hills/contents/images/1920x1080.png") == "usr/share/wallpapers/Hills"
    assert art.group_key("a/dunes-l.webp") == art.group_key("a/dunes-d.webp") == "a/dunes"
    assert art.group_key("a/day.png") != art.group_key("a/night.png")


@pytest.mark.skipif(not SYSTEM_FONT.exists(), reason="needs DejaVuSans (fonts-dejavu-core)")
def test_fonts_feed_lettering_and_manga_pages(fake_root: Path, tmp_path: Path):
    res = art.build(tmp_path / "set", _opts(fake_root), log=lambda *a: None)
    kinds = [r["kind"] for r in res.records]
    assert kinds.count("lettering") >= 1 and kinds.count("manga") >= 1
    page = next(r for r in res.records if r["kind"] == "manga")
    arr = np.asarray(Image.open(tmp_path / "set" / page["file"]))
    assert np.array_equal(arr[..., 0], arr[..., 1])  # grey page
    assert (arr < 40).mean() > 0.01 and (arr > 215).mean() > 0.2  # ink on paper


def test_existing_output_is_refused_and_nothing_written(fake_root: Path, tmp_path: Path):
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    with pytest.raises(art.ArtBuildError, match="not an empty folder"):
        art.build(out, _opts(fake_root), log=lambda *a: None)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_no_sources_says_what_to_install(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(art.ArtBuildError, match="apt-get install"):
        art.build(tmp_path / "set", _opts(tmp_path / "empty"), log=lambda *a: None)
    assert not (tmp_path / "set").exists() and not (tmp_path / "set.partial").exists()


def test_screentone_mean_matches_its_level():
    for level in (0.3, 0.6, 0.85):
        tone = art.screentone((240, 240), level, pitch=6.0, angle=45.0)
        assert abs(float(tone.mean()) - level) < 0.05


@pytest.mark.parametrize("renderer", ["rsvg-convert", "cairosvg"])
def test_each_svg_renderer_draws_the_clip_art(renderer: str, fake_root: Path, tmp_path: Path):
    if renderer == "rsvg-convert" and not shutil.which("rsvg-convert"):
        pytest.skip("rsvg-convert (librsvg2-bin) not installed")
    if renderer == "cairosvg":
        pytest.importorskip("cairosvg")
    res = art.build(tmp_path / "set", _opts(fake_root, renderer=renderer, lettering=0, manga=0), log=lambda *a: None)
    clips = [r for r in res.records if r["kind"] == "clipart"]
    assert len(clips) == 14  # every good SVG; broken and huge ones skipped
    for r in clips:
        arr = np.asarray(Image.open(tmp_path / "set" / r["file"]), dtype=np.float32)
        assert arr.min() < 30 and arr.max() > 240  # black outline on white paper
        w, h = r["size"]
        assert w > h  # aspect ratio kept (the SVGs are wider than tall)
    assert any(s["reason"].startswith("broken svg") for s in res.skipped)


def test_pixel_hash_ignores_the_png_encoder_but_not_the_pixels(fake_root: Path, tmp_path: Path):
    res = art.build(tmp_path / "a", _opts(fake_root), log=lambda *a: None)
    rec = res.records[0]
    path = tmp_path / "a" / rec["file"]
    with Image.open(path) as im:
        im.load()
        assert art.pixels_sha256(im) == rec["pixels_sha256"]
        im.save(tmp_path / "other.png", format="PNG", compress_level=0)  # other bytes, same pixels
        changed = im.copy()
    with Image.open(tmp_path / "other.png") as other:
        other.load()
        assert (tmp_path / "other.png").read_bytes() != path.read_bytes()
        assert art.pixels_sha256(other) == rec["pixels_sha256"]
    changed.putpixel((0, 0), tuple(255 - v for v in changed.getpixel((0, 0))))
    assert art.pixels_sha256(changed) != rec["pixels_sha256"]
    # the set's content hash follows every image's pixels
    records = [dict(r) for r in res.records]
    assert art.data_pixels_sha256(records) == res.summary["pixels_sha256"]
    records[-1]["pixels_sha256"] = "0" * 64
    assert art.data_pixels_sha256(records) != res.summary["pixels_sha256"]
