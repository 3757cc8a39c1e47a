"""bench/peers.py: the classic anime upscalers (waifu2x, Real-CUGAN, Real-ESRGAN) run through ncnn as
bench peers. The tests that run a model need the bench-only packages of bench/requirements-peers.txt
and skip without them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from bench import peers as P
from training.degradations import make_lr
from training.imresize import imresize
from training.metrics import psnr_y, quantize

PEER_NAMES = list(P.PEERS)


def need(name: str) -> P.Peer:
    """The peer, or skip with the reason it cannot run here (ncnn or its model package missing)."""
    pytest.importorskip("ncnn", reason="ncnn not installed (pip install -r bench/requirements-peers.txt)")
    reason = P.available_peers()[name]
    if reason:
        pytest.skip(f"{name}: {reason}")
    return P.Peer(name, threads=1)


@pytest.fixture(scope="module")
def loaded() -> dict[str, P.Peer]:
    """Peers are loaded once per module (a cunet load is ~0.1 s)."""
    return {}


def get(loaded: dict, name: str) -> P.Peer:
    if name not in loaded:
        loaded[name] = need(name)
    return loaded[name]


def line_art(size: int = 96, seed: int = 0) -> torch.Tensor:
    """``[1, 3, size, size]`` clean anti-aliased line art: thick black curves and ellipses (and a few
    flat fills) drawn on white at 4x, downsampled by 4 with LANCZOS."""
    rng = np.random.default_rng(seed)
    big = size * 4
    im = Image.new("RGB", (big, big), "white")
    draw = ImageDraw.Draw(im)
    for _ in range(5):
        x0, y0 = rng.integers(0, big * 3 // 4, 2)
        w, h = rng.integers(big // 6, big // 2, 2)
        fill = tuple(int(c) for c in rng.integers(150, 256, 3)) if rng.random() < 0.5 else None
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        draw.ellipse(box, outline="black", fill=fill, width=int(rng.integers(6, 14)))
    for _ in range(4):
        pts = [tuple(int(v) for v in rng.integers(0, big, 2)) for _ in range(4)]
        draw.line(pts, fill="black", width=int(rng.integers(5, 12)), joint="curve")
    small = im.resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.array(small)).permute(2, 0, 1).float().div(255).unsqueeze(0)


def test_table_is_consistent():
    for name, spec in P.PEERS.items():
        assert spec.scale in (2, 4), name
        assert spec.border in ("replicate", "reflect") and spec.crop in ("origin", "prepadding"), name
        assert spec.add_input == (spec.runner == "realcugan" and spec.scale == 4), name
    assert P.PEERS["waifu2x-upconv7-anime-scale2x"].arch == "upconv_7"


def test_missing_package_is_reported(monkeypatch):
    fake = dataclasses.replace(
        P.PEERS["waifu2x-cunet-scale2x"], package="no_such_model_pkg_xyz", pip="no-such-model-pkg-xyz"
    )
    monkeypatch.setitem(P.PEERS, "fake-peer", fake)
    reason = P.available_peers()["fake-peer"]
    assert "no-such-model-pkg-xyz" in reason
    with pytest.raises(P.PeerUnavailable, match="pip install no-such-model-pkg-xyz|ncnn"):
        P.Peer("fake-peer")


@pytest.mark.parametrize("name", PEER_NAMES)
@pytest.mark.parametrize("hw", [(20, 24), (21, 23)], ids=["20x24", "21x23-odd"])
def test_shape_and_range(loaded, name, hw):
    peer = get(loaded, name)
    lr = torch.rand(1, 3, *hw)
    sr = peer(lr)
    s = P.PEERS[name].scale
    assert peer.scale == s
    assert sr.shape == (1, 3, hw[0] * s, hw[1] * s)
    assert sr.dtype == torch.float32
    assert float(sr.min()) >= 0.0 and float(sr.max()) <= 1.0
    assert bool(torch.isfinite(sr).all())


@pytest.mark.parametrize("name", PEER_NAMES)
def test_deterministic(loaded, name):
    peer = get(loaded, name)
    lr = line_art(32, seed=1)[..., :, :30]
    assert torch.equal(peer(lr), peer(lr))


def test_upconv7_param_check():
    """The WAIFU2X_ANIME_UP2X file is waifu2x upconv_7 (the check runs on load); cunet is not."""
    peer = need("waifu2x-upconv7-anime-scale2x")
    param, _ = P._model_files(peer.spec)
    P._check_param(peer.spec, param)
    cunet_param, _ = P._model_files(P.PEERS["waifu2x-cunet-scale2x"])
    with pytest.raises(RuntimeError, match="not waifu2x upconv_7"):
        P._check_param(peer.spec, cunet_param)


def test_cunet_beats_bicubic_on_line_art(loaded):
    peer = get(loaded, "waifu2x-cunet-scale2x")
    hr = line_art(96, seed=0)
    lr = make_lr(hr, 2, "matlab")
    peer_psnr = psnr_y(quantize(peer(lr)), hr, 2)
    bicubic_psnr = psnr_y(quantize(imresize(lr, 2).float()), hr, 2)
    assert peer_psnr >= bicubic_psnr + 1.0, (peer_psnr, bicubic_psnr)
