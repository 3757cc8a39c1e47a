"""LAMNet, EIMN and the DaViT-style transformer against SwinIR-light, x4, on one input in one run.

    python bench/bench_sr_archs.py [--size 64] [--repeats 3] [--threads N] [--macs-size 256]

Random weights, published configs: LAMNet base x4, EIMN_L x4, the transformer SR(4, 8, 256, 4, 16),
and SwinIR-light x4 (spandrel's SwinIR: embed 60, depths/heads 6x4, window 8, mlp 2,
pixelshuffledirect). Params; MACs at ``--macs-size`` (FlopCounterMode FLOPs / 2); CPU latency on a
``--size`` square input, median of ``--repeats``; the ratio of each to SwinIR-light.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import count_macs, count_params, cpu_latency, human, machine_note, print_table  # noqa: E402


def swinir_light_x4() -> torch.nn.Module:
    from spandrel.architectures.SwinIR import SwinIR

    return SwinIR(
        upscale=4, img_size=64, window_size=8, img_range=1.0, depths=[6, 6, 6, 6], embed_dim=60,
        num_heads=[6, 6, 6, 6], mlp_ratio=2, upsampler="pixelshuffledirect", resi_connection="1conv",
    )


def models() -> dict[str, torch.nn.Module]:
    from archs.eimn import EIMN_L
    from archs.lamnet import LAMNet_base
    from archs.transformer_sr import PUBLISHED, SR

    return {
        "LAMNet base x4": LAMNet_base(scale=4),
        "EIMN_L x4": EIMN_L(scale=4),
        "TransformerSR b8 d256 w4 h16 x4": SR(**PUBLISHED),
        "SwinIR-light x4 (spandrel)": swinir_light_x4(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="latency input side in pixels (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--macs-size", type=int, default=256, help="input side for the MAC count (default 256)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(1, 3, args.size, args.size)
    print(f"# SR architectures x4; {machine_note()}")
    print(f"# MACs at {args.macs_size}x{args.macs_size}; latency on {args.size}x{args.size}, median of {args.repeats}\n")
    stats = {}
    for name, model in models().items():
        model.eval()
        macs = count_macs(model, (1, 3, args.macs_size, args.macs_size))
        lat = cpu_latency(model, x, repeats=args.repeats, warmup=args.warmup)
        stats[name] = (count_params(model), macs, lat["median"], lat["cpu_median"])
    ref = stats["SwinIR-light x4 (spandrel)"][2]
    rows = [
        (name, human(p), human(m), f"{t * 1000:.0f} ms", f"{c * 1000:.0f} ms", f"{ref / t:.2f}x")
        for name, (p, m, t, c) in stats.items()
    ]
    print_table(rows, ["model", "params", f"MACs@{args.macs_size}", "latency (wall)", "CPU time", "speed vs SwinIR-light"])


if __name__ == "__main__":
    main()
