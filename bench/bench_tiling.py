"""Tiled upscaling: FlexSR's engine against ComfyUI's built-in algorithm, on one model and one image.

    python bench/bench_tiling.py                       # CPU, spandrel Compact (16 feat, 4 convs, x4)
    python bench/bench_tiling.py --device cuda --feat 64 --conv 16
    python bench/bench_tiling.py --arch flexnet --feat 16 --conv 1 --size 512
    python bench/bench_tiling.py --model path/to/model.safetensors

Prints, for a --size² image (default 1024): the median time of each method (interleaved runs; process
CPU time on a CPU, wall time on CUDA) and the throughput ratios, each
method's seam PSNR against the whole-image result, then (one subprocess per method, RSS high-water mark
from ``/proc/self/status`` VmHWM; CUDA: ``torch.cuda.max_memory_allocated``) the peak memory of producing
the x{scale} output of a --memory-size² image (default 2048).

"ComfyUI" is ``comfy.utils.tiled_scale`` as ``ImageUpscaleWithModel`` uses it, rewritten here from its
description (read in ComfyUI's source): fixed 512 px tiles with 32 px overlap, tile origins every
480 px (a sliver tile at the edge), a linear feather over the scaled overlap on every tile edge, output
and weight-sum buffers of the full output size divided at the end, clamp, and on out-of-memory the
tile halved and the whole image restarted (down to 128 px).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_pack():
    """The pack as a package (its nodes use relative imports), as ComfyUI imports it."""
    name = "flexsr_bench_pack"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_model(pack, args):
    if args.model:
        return pack.archs.load_model(args.model)
    torch.manual_seed(0)
    if args.arch == "flexnet":
        flexnet = importlib.import_module(pack.archs.__name__ + ".flexnet")
        module = flexnet.FlexNet(dim=args.feat, num_blocks=(args.conv,) * 2, scale=args.scale)
    else:
        from spandrel.architectures.Compact import Compact

        module = Compact(num_in_ch=3, num_out_ch=3, num_feat=args.feat, num_conv=args.conv, upscale=args.scale)
    return pack.archs.load_model(module.eval().state_dict())


def test_image(size: int, seed: int = 0) -> torch.Tensor:
    """A [1, size, size, 3] image with smooth regions, edges and fine texture (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, size // 64), max(2, size // 64), generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    stripes = ((xx // 37 + yy // 53) % 2).float()[None, None] * 0.3
    img = img + stripes + 0.08 * torch.rand(1, 3, size, size, generator=g)
    return img.clamp(0, 1).permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------------------------------
# ComfyUI's algorithm


def comfy_steps(width, height, tile, overlap):
    rows = 1 if height <= tile else math.ceil((height - overlap) / (tile - overlap))
    cols = 1 if width <= tile else math.ceil((width - overlap) / (tile - overlap))
    return rows * cols


@torch.inference_mode()
def comfy_tiled_scale(samples, function, tile=512, overlap=32, scale=4, out_channels=3, device="cpu"):
    """[B, C, H, W] -> [B, C', H*s, W*s] the way comfy.utils.tiled_scale does it."""
    b_, _, h, w = samples.shape
    output = torch.empty(b_, out_channels, h * scale, w * scale)
    for b in range(b_):
        s = samples[b : b + 1]
        if h <= tile and w <= tile:
            output[b : b + 1] = function(s).to("cpu")
            continue
        out = torch.zeros(1, out_channels, h * scale, w * scale)
        out_div = torch.zeros(1, out_channels, h * scale, w * scale)
        positions = [range(0, d - overlap, tile - overlap) if d > tile else [0] for d in (h, w)]
        for y, x in itertools.product(*positions):
            py = max(0, min(h - overlap, y))
            px = max(0, min(w - overlap, x))
            ly, lx = min(tile, h - py), min(tile, w - px)
            ps = function(s[:, :, py : py + ly, px : px + lx].to(device)).to("cpu")
            mask = torch.ones_like(ps)
            feather = round(overlap * scale)
            for d in (2, 3):
                if feather >= mask.shape[d]:
                    continue
                for t in range(feather):
                    a = (t + 1) / feather
                    mask.narrow(d, t, 1).mul_(a)
                    mask.narrow(d, mask.shape[d] - 1 - t, 1).mul_(a)
            o = out[:, :, py * scale : py * scale + mask.shape[2], px * scale : px * scale + mask.shape[3]]
            o_d = out_div[:, :, py * scale : py * scale + mask.shape[2], px * scale : px * scale + mask.shape[3]]
            o.add_(ps * mask)
            o_d.add_(mask)
        output[b : b + 1] = out / out_div
    return output


def comfy_upscale(model, image, device):
    """ImageUpscaleWithModel.execute: restart on OOM with a halved tile, clamp, back to [B, H, W, C]."""
    model.to(device)
    in_img = image.movedim(-1, -3)
    tile, overlap = 512, 32
    while True:
        try:
            s = comfy_tiled_scale(in_img, lambda a: model(a), tile=tile, overlap=overlap, scale=model.scale,
                                  out_channels=model.output_channels, device=device)
            break
        except torch.OutOfMemoryError:
            tile //= 2
            if tile < 128:
                raise
    model.to("cpu")
    return torch.clamp(s.movedim(-3, -1), min=0, max=1.0)


# --------------------------------------------------------------------------------------------------


def whole_image(model, image, device):
    with torch.inference_mode():
        model.to(device)
        out = model(image.permute(0, 3, 1, 2).to(device)).float().cpu()
        model.to("cpu")
    return out.permute(0, 2, 3, 1)


def ours(pack, model, image, device, precision="fp32", tile=0):
    out, report = pack.nodes.engine.upscale_image(model, image, device=device, precision=precision, tile_size=tile)
    return out, report


def one_line(report) -> str:
    return report.text().replace("\n", "; ")


def psnr(a, b):
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def timed(fn, device):
    """(result, (wall seconds, CPU seconds of this process)); CPU time is what to compare on a shared machine."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, (time.perf_counter() - t0, time.process_time() - c0)


def vm_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (0 where /proc is missing).

    ``VmHWM`` is the high-water mark of this process's own address space. ``getrusage``'s ru_maxrss is
    not used: after fork+exec Linux keeps the parent's high-water mark in it, so a child started by a
    big parent reports the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if field == "VmHWM" else 0


def memory_child(args) -> None:
    """Run one method on the --memory-size image and print its memory high-water marks as JSON."""
    pack = load_pack()
    model = build_model(pack, args)
    image = test_image(args.memory_size, seed=1)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = vm_kib("VmRSS")
    if args.method == "ours":
        out, _ = ours(pack, model, image, args.device, args.precision)
    else:
        out = comfy_upscale(model, image, args.device)
    peak = vm_kib("VmHWM")
    result = {
        "method": args.method,
        "rss_before": before,
        "rss_peak": peak,
        "output_bytes": out.numel() * out.element_size(),
        "input_bytes": image.numel() * image.element_size(),
        "cuda_peak": torch.cuda.max_memory_allocated() if cuda else 0,
    }
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a checkpoint to use instead of a random spandrel Compact")
    p.add_argument("--arch", choices=("compact", "flexnet"), default="compact", help="random model to build")
    p.add_argument("--feat", type=int, default=16, help="Compact feature channels / FlexNet dim")
    p.add_argument("--conv", type=int, default=4, help="Compact convolutions / FlexNet blocks per group (2 groups)")
    p.add_argument("--scale", type=int, default=4, help="model scale")
    p.add_argument("--size", type=int, default=1024, help="throughput/seam image side")
    p.add_argument("--memory-size", type=int, default=2048, help="memory test image side (output x scale)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", help="our engine's precision (ComfyUI's runs the model's dtype)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per method (median is reported)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method:
        memory_child(args)
        return

    pack = load_pack()
    model = build_model(pack, args)
    params = sum(t.numel() for t in model.model.parameters())
    print(f"model: {model.architecture.name} x{model.scale}, {params:,} params; device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    image = test_image(args.size)
    warm = test_image(64)
    whole_image(model, warm, args.device)
    ours(pack, model, warm, args.device, args.precision)
    comfy_upscale(model, warm, args.device)

    runs = {"whole": [], "ours": [], "comfy": [], "ours512": []}
    for _ in range(args.repeat):  # interleaved, median of N: the machine may be shared
        ref, t = timed(lambda: whole_image(model, image, args.device), args.device)
        runs["whole"].append(t)
        (mine, report), t = timed(lambda: ours(pack, model, image, args.device, args.precision), args.device)
        runs["ours"].append(t)
        theirs, t = timed(lambda: comfy_upscale(model, image, args.device), args.device)
        runs["comfy"].append(t)
        (fixed, rep512), t = timed(lambda: ours(pack, model, image, args.device, args.precision, tile=512),
                                   args.device)
        runs["ours512"].append(t)
    cuda = args.device.startswith("cuda")
    key = 0 if cuda else 1  # compare wall time on CUDA, CPU time on a CPU (robust to other load)
    best = {k: statistics.median(t[key] for t in v) for k, v in runs.items()}
    steps = comfy_steps(args.size, args.size, 512, 32)
    mpx = args.size**2 / 1e6

    def line(label, name, extra=""):
        walls = " ".join(f"{t[0]:.2f}" for t in runs[name])
        cpus = " ".join(f"{t[1]:.2f}" for t in runs[name])
        return (f"  {label:24s} {best[name]:7.2f} s  {mpx / best[name]:6.3f} MPx/s{extra}\n"
                f"  {'':24s} (wall: {walls}; CPU: {cpus})")

    what = "wall time" if cuda else "process CPU time"
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\n{args.size}x{args.size} -> x{model.scale}, median {what} of {args.repeat} (interleaved; load {load})")
    print(line("whole image (no tiling)", "whole"))
    print(line("FlexSR engine (auto)", "ours", f"  seam PSNR {psnr(mine, ref):6.1f} dB  [{one_line(report)}]"))
    print(line("ComfyUI tiled_scale", "comfy",
               f"  seam PSNR {psnr(theirs, ref):6.1f} dB  [{steps} tiles of 512 px, 32 px overlap]"))
    print(line("FlexSR engine, 512 tiles", "ours512", f"  seam PSNR {psnr(fixed, ref):6.1f} dB  [{one_line(rep512)}]"))
    print(f"  FlexSR auto / whole image: {best['ours'] / best['whole']:.3f} of the time (<= 1.05 is the target)")
    print(f"  throughput ratio FlexSR / ComfyUI: {best['comfy'] / best['ours']:.2f}x (auto), "
          f"{best['comfy'] / best['ours512']:.2f}x (512 px tiles)")

    if args.skip_memory:
        return
    print(f"\npeak memory, {args.memory_size}x{args.memory_size} -> x{model.scale} "
          f"(one subprocess per method; RSS high-water mark VmHWM)")
    base = [sys.executable, str(Path(__file__).resolve()), "--memory-size", str(args.memory_size), "--device",
            args.device, "--precision", args.precision, "--feat", str(args.feat), "--conv", str(args.conv),
            "--scale", str(args.scale), "--arch", args.arch] + (["--model", args.model] if args.model else []) + (
            ["--threads", str(args.threads)] if args.threads else [])
    for method in ("ours", "comfy"):
        proc = subprocess.run(base + ["--method", method], capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            print(f"  {method}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        gib = 1 << 30
        name = "FlexSR engine" if method == "ours" else "ComfyUI tiled_scale"
        extra = f", CUDA peak {r['cuda_peak'] / gib:.2f} GiB" if r["cuda_peak"] else ""
        grown = r["rss_peak"] - r["rss_before"]
        io = r["output_bytes"] + r["input_bytes"]
        print(f"  {name:22s} RSS peak {r['rss_peak'] / gib:6.2f} GiB (+{grown / gib:5.2f} "
              f"GiB during the run = {grown / io:.2f} x (input + output); output alone {r['output_bytes'] / gib:.2f} "
              f"GiB){extra}")


if __name__ == "__main__":
    main()
