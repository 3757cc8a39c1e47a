"""LAMNet, EIMN and the DaViT-style transformer against SwinIR-light, on one input in one run.

    python bench/bench_sr_archs.py [--scale 4] [--size 64] [--repeats 3] [--threads 1] [--macs-size 256]
                                   [--only NAME,...] [--kept-heap]

Random weights, published configs at ``--scale`` (2 or 4): LAMNet base, EIMN_L, EIMN_A, the
transformer SR(scale, 8, 256, 4, 16), and SwinIR-light (spandrel's SwinIR: embed 60, depths/heads
6x4, window 8, mlp 2, pixelshuffledirect). Params; MACs at ``--macs-size`` (FlopCounterMode FLOPs / 2); the models run
interleaved (A, B, C, D, A, ...) on a ``--size`` square input and each one's median process CPU time
is reported (see :mod:`bench.common`), with GMAC/s as a share of a plain 3x3 conv timed in the same run;
the speed ratio to SwinIR-light is taken from the CPU times. ``--only`` keeps the models whose names
start with one of the given words (``--only EIMN,LAMNet``; SwinIR-light is then left out too);
``--kept-heap`` runs everything inside ``nodes/heap.py``'s ``kept_heap()``, as the upscale engine runs
models on a CPU (glibc keeps freed activation memory instead of page-faulting it in again each call).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    conv3x3_limit,
    count_macs,
    count_params,
    human,
    interleaved,
    load_average,
    load_heap_module,
    machine_note,
    print_table,
)


def swinir_light(scale: int = 4) -> torch.nn.Module:
    from spandrel.architectures.SwinIR import SwinIR

    return SwinIR(
        upscale=scale, img_size=64, window_size=8, img_range=1.0, depths=[6, 6, 6, 6], embed_dim=60,
        num_heads=[6, 6, 6, 6], mlp_ratio=2, upsampler="pixelshuffledirect", resi_connection="1conv",
    )


def models(scale: int = 4) -> dict[str, torch.nn.Module]:
    from archs.eimn import EIMN_A, EIMN_L
    from archs.lamnet import LAMNet_base
    from archs.transformer_sr import PUBLISHED, SR

    return {
        f"LAMNet base x{scale}": LAMNet_base(scale=scale),
        f"EIMN_L x{scale}": EIMN_L(scale=scale),
        f"EIMN_A x{scale}": EIMN_A(scale=scale),
        f"TransformerSR b8 d256 w4 h16 x{scale}": SR(**{**PUBLISHED, "factor": scale}),
        f"SwinIR-light x{scale} (spandrel)": swinir_light(scale),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=4, choices=(2, 4), help="upscaling factor (default 4)")
    parser.add_argument("--size", type=int, default=64, help="latency input side in pixels (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--macs-size", type=int, default=256, help="input side for the MAC count (default 256)")
    parser.add_argument("--only", default="", help="comma-separated model name prefixes to keep (default: all)")
    parser.add_argument("--kept-heap", action="store_true", help="run inside the engine's kept_heap() (glibc)")
    args = parser.parse_args(argv)
    with load_heap_module().kept_heap(args.kept_heap) as kept:
        run(args, kept)


def run(args, kept: bool) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(1, 3, args.size, args.size)
    print(f"# SR architectures x{args.scale}; {machine_note()}")
    print(f"# MACs at {args.macs_size}x{args.macs_size}; CPU time on {args.size}x{args.size}: interleaved runs, "
          f"median of {args.repeats} after {args.warmup} warm-up round; glibc heap kept during the run "
          f"(as in the engine): {'yes' if kept else 'no'}\n")
    wanted = [w.strip().lower() for w in args.only.split(",") if w.strip()]
    nets = {name: m.eval() for name, m in models(args.scale).items()
            if not wanted or any(name.lower().startswith(w) for w in wanted)}
    if not nets:
        raise SystemExit(f"--only {args.only!r} matches none of: {', '.join(models(args.scale))}")
    candidates = {name: (lambda m=m: m(x)) for name, m in nets.items()}
    conv, conv_macs = conv3x3_limit(args.size, args.size)
    candidates["conv3x3 (limit)"] = conv
    times = interleaved(candidates, repeats=args.repeats, warmup=args.warmup)
    limit = conv_macs / times["conv3x3 (limit)"]["cpu"]
    ref = times.get(f"SwinIR-light x{args.scale} (spandrel)", {}).get("cpu")
    rows = []
    for name, m in nets.items():
        t = times[name]
        rate = count_macs(m, (1, 3, args.size, args.size)) / t["cpu"]
        rows.append((name, human(count_params(m)), human(count_macs(m, (1, 3, args.macs_size, args.macs_size))),
                     f"{t['cpu'] * 1000:.0f} ms", f"{t['wall'] * 1000:.0f} ms", f"{rate / 1e9:.1f}",
                     f"{100 * rate / limit:.0f}%", f"{ref / t['cpu']:.2f}x" if ref else "-"))
    print_table(rows, ["model", "params", f"MACs@{args.macs_size}", "CPU time", "wall", "GMAC/s", "of conv limit",
                       "speed vs SwinIR-light (CPU time)"])
    print(f"\nconv limit: {limit / 1e9:.1f} GMAC/s; {load_average()} after the run")


if __name__ == "__main__":
    main()
