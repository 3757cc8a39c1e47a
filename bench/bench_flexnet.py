"""FlexNet benchmark: params, MACs at 256x256, CPU latency fused vs unfused, and FlexNet against ESRGAN.

    python bench/bench_flexnet.py [--size 64] [--repeats 3] [--warmup 1] [--threads N] [--macs-size 256]

Models (random weights, x4): FlexNet (linear, the defaults), MetaFlexNet, and spandrel's ESRGAN
(RRDBNet, 23 blocks, 64 features). MACs are counted at ``--macs-size`` (default 256x256 input);
latency is measured on a ``--size`` x ``--size`` input (default 64, so the whole run takes a few
minutes on 2 CPU cores). "fused" = after ``archs.fuse`` (OmniShift's four branches as one 5x5 conv).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import archs  # noqa: E402
from archs.flexnet import FlexNet, MetaFlexNet  # noqa: E402
from bench.common import count_macs, count_params, cpu_latency, human, machine_note, print_table  # noqa: E402


def esrgan_x4() -> torch.nn.Module:
    from spandrel.architectures.ESRGAN import ESRGAN

    return ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="latency input side in pixels (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; use 1 on a machine shared with other jobs)")
    parser.add_argument("--macs-size", type=int, default=256, help="input side for the MAC count (default 256)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    models = {"FlexNet x4 (linear)": FlexNet(), "MetaFlexNet x4": MetaFlexNet(), "ESRGAN x4 (23 RRDB, 64 nf)": esrgan_x4()}
    x = torch.rand(1, 3, args.size, args.size)
    macs_shape = (1, 3, args.macs_size, args.macs_size)

    print(f"# FlexNet benchmark; {machine_note()}")
    print(f"# MACs = FlopCounterMode FLOPs / 2 at {args.macs_size}x{args.macs_size}; latency: {args.size}x{args.size} "
          f"input, median of {args.repeats} after {args.warmup} warm-up, inference_mode, fp32; "
          f"times as wall / process CPU time\n")

    rows, stats = [], {}
    for name, model in models.items():
        model.eval()
        params = count_params(model)
        macs = count_macs(model, macs_shape)
        unfused = cpu_latency(model, x, repeats=args.repeats, warmup=args.warmup)
        fused_model = archs.fuse(copy.deepcopy(model)).eval()
        fused, diff = unfused, None
        if archs.fusable_modules(fused_model):
            fused = cpu_latency(fused_model, x, repeats=args.repeats, warmup=args.warmup)
            with torch.inference_mode():
                diff = (fused_model(x) - model(x)).abs().max().item()
        stats[name] = dict(params=params, macs=macs, wall=fused["median"], cpu=fused["cpu_median"])
        ms = lambda t: f"{t['median'] * 1e3:.0f} / {t['cpu_median'] * 1e3:.0f}"  # noqa: E731
        rows.append([
            name,
            human(params),
            human(macs),
            ms(unfused),
            ms(fused) if diff is not None else "-",
            f"{unfused['median'] / fused['median']:.2f}x / {unfused['cpu_median'] / fused['cpu_median']:.2f}x"
            if diff is not None else "-",
            f"{diff:.1e}" if diff is not None else "-",
        ])
        del fused_model

    print_table(rows, ["model", "params", f"MACs@{args.macs_size}", "unfused ms (wall / cpu)",
                       "fused ms (wall / cpu)", "unfused/fused (wall / cpu)", "max|fused-unfused|"])

    flex, esr = stats["FlexNet x4 (linear)"], stats["ESRGAN x4 (23 RRDB, 64 nf)"]
    print("\nFlexNet (linear, fused) relative to ESRGAN on the same input, same run:")
    print_table(
        [
            ["params", f"{flex['params'] / esr['params']:.3f}"],
            [f"MACs@{args.macs_size}", f"{flex['macs'] / esr['macs']:.3f}"],
            [f"CPU latency {args.size}x{args.size}, wall", f"{flex['wall'] / esr['wall']:.3f}"],
            [f"CPU latency {args.size}x{args.size}, process CPU time", f"{flex['cpu'] / esr['cpu']:.3f}"],
        ],
        ["FlexNet / ESRGAN", "ratio"],
    )

if __name__ == "__main__":
    main()
