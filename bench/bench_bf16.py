"""bf16 on the CPU, per family: speed-up over fp32 and PSNR against fp32 on a real image.

    python bench/bench_bf16.py [--size 64] [--repeats 3] [--threads 1] [--image PATH]

For each FlexSR family (published configs, x4, random weights: FlexNet, MetaFlexNet, LMLT, LAMNet,
EIMN_L, EIMN_A, the DaViT transformer, and spandrel's Compact for comparison; FlexNet also as the shipped
trained default x2) the model runs on a ``--size`` square crop of a Set14 image (``../shared/data/Set14`` by
default) in fp32 and under ``torch.autocast("cpu", bfloat16)`` (as the engine runs it: weights stay
fp32), interleaved, medians of process CPU time. PSNR is the bf16 output against the fp32 output, both
clamped to 0..1. A model "counts" for bf16 when it is faster and its PSNR is at least 45 dB; a family
(the architecture id the engine keys on, so MetaFlexNet is "FlexNet" and EIMN_A is "EIMN") counts when
every one of its models does, and the last line names those families. The engine's
``CPU_BF16_FAMILIES`` lists the families that counted in two runs on this kind of CPU. Random weights give
outputs of arbitrary contrast, so the spread of the fp32 output (its standard deviation) is printed
beside: a PSNR on a flat output would mean nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import interleaved, load_average, machine_note, print_table  # noqa: E402

DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "Set14" / "LRbicx4" / "baboon.png"


def cpu_bf16_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "n/a"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return ", ".join(sorted(f for f in flags if "bf16" in f)) or "none"


def read_image(path: Path, size: int) -> torch.Tensor:
    from PIL import Image
    import numpy as np

    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    h, w = x.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return x[:, :, top : top + size, left : left + size].contiguous()


def families() -> dict[str, tuple[str, torch.nn.Module]]:
    import archs
    from archs.eimn import EIMN_A, EIMN_L
    from archs.lamnet import LAMNet_base
    from archs.lmlt import LMLT_base
    from archs.transformer_sr import PUBLISHED, SR
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    out = {
        "FlexNet x4 (default config, random)": ("FlexNet", archs.FlexNet()),
        "MetaFlexNet x4 (preset, random)": ("FlexNet", archs.MetaFlexNet()),
        "LMLT base x4": ("LMLT", LMLT_base(scale=4)),
        "LAMNet base x4": ("LAMNet", LAMNet_base(scale=4)),
        "EIMN_L x4": ("EIMN", EIMN_L(scale=4)),
        "EIMN_A x4": ("EIMN", EIMN_A(scale=4)),
        "TransformerSR published x4": ("TransformerSR", SR(**PUBLISHED)),
        "Compact x4 (spandrel, 64 feat, 16 conv)": ("Compact", Compact(num_in_ch=3, num_out_ch=3, num_feat=64,
                                                                        num_conv=16, upscale=4)),
    }
    shipped = ROOT / "models" / "FlexSR_default_x2.safetensors"
    if shipped.exists():
        out["FlexNet x2 (shipped, trained)"] = ("FlexNet", archs.load_model(shipped).model)
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double().clamp(0, 1) - b.double().clamp(0, 1)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="crop side in pixels (default 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--only", default="", help="comma-separated substrings of the model names to run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = read_image(args.image, args.size)
    print(f"# bf16 autocast vs fp32 on CPU; {machine_note()}; bf16 flags: {cpu_bf16_flags()}")
    print(f"# {args.image.name} crop {x.shape[-1]}x{x.shape[-2]}; interleaved, median of {args.repeats} CPU times\n")
    rows = []
    family_counts: dict[str, bool] = {}
    for name, (family, model) in families().items():
        if args.only and not any(s.strip() and s.strip() in name for s in args.only.split(",")):
            continue
        model.eval()

        def bf16(m=model):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(x)

        with torch.inference_mode():
            ref, low = model(x).float(), bf16().float()
        times = interleaved({"fp32": lambda m=model: m(x), "bf16": bf16}, repeats=args.repeats, warmup=1)
        speed = times["fp32"]["cpu"] / times["bf16"]["cpu"]
        quality = psnr(low, ref)
        counts = speed > 1.0 and quality >= 45.0
        family_counts[family] = family_counts.get(family, True) and counts
        rows.append([name, family, f"{times['fp32']['cpu'] * 1e3:.0f}", f"{times['bf16']['cpu'] * 1e3:.0f}",
                     f"{speed:.2f}x", f"{quality:.1f}", f"{float(ref.clamp(0, 1).std()):.3f}",
                     "yes" if counts else "no"])
        print(f"  {name}: {speed:.2f}x, {quality:.1f} dB ({load_average()})", flush=True)
    print()
    print_table(rows, ["model", "family", "fp32 ms", "bf16 ms", "bf16 speed-up", "PSNR vs fp32 dB", "output std",
                       "counts"])
    counted = sorted(f for f, ok in family_counts.items() if ok)
    print(f"\nfamilies that count (every model faster, >= 45 dB): {', '.join(counted) or 'none'}; {load_average()}")


if __name__ == "__main__":
    main()
