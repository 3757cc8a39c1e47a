"""FSA (LAMNet's focal separable attention) on the CPU: naive per-tap vs FlexSR's implementation,
and a whole LAMNet base x4 forward pass.

    python bench/bench_fsa.py [--size 256] [--model-size 128] [--repeats 5] [--threads N]

The FSA layer is LAMNet-base-like: dim 64 -> 32 channels enter FSA, 4 heads, the release kernel map
(13 taps reaching 11 pixels each way), random inputs, tanh'd random tap weights. Variants:

* per tap: the formula as written, a fresh box sum per tap from shifted slices (``fsa_per_tap``);
* prefix sum: one zero-padded cumulative sum, each tap the difference of two slices (``fsa_prefix_sum``);
* run means, one band: box means of each distinct run length built once, one fused multiply-add per
  tap over the whole tensor (``fsa_spatial(..., band_elements=0)``, the path taken under autograd and
  on accelerators);
* run means, banded: the same in bands of rows sized for the cache (``fsa_spatial``, the CPU default).

Figures are median / min wall time and median process CPU time (see ``bench/common.py``). On a shared
machine the wall time includes waiting for a core; with one thread the CPU time is the steadier one.
glibc's allocator returns large blocks to the OS and page-faults them back on the next allocation;
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (or jemalloc) remove that cost; the script
says whether they are set.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import count_params, cpu_latency, machine_note, print_table  # noqa: E402

RELEASE_MAP = ((-8, 4), (-6, 2), (-4, 2), (-3, 1), (-2, 1), (-1, 1), (0, 1), (1, 1), (2, 1), (3, 1), (4, 2), (6, 2), (8, 4))


def fsa_variants():
    from archs.fsa import fsa_per_tap, fsa_prefix_sum, fsa_spatial

    return {
        "per tap (naive)": fsa_per_tap,
        "prefix sum": fsa_prefix_sum,
        "run means, one band": lambda x, k, m, g, d: fsa_spatial(x, k, m, g, d, band_elements=0),
        "run means, banded (default)": fsa_spatial,
    }


def bench_fsa(size: int, repeats: int, channels: int = 32, heads: int = 4) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, size, size, generator=gen)
    kernel = torch.randn(1, heads * len(RELEASE_MAP), size, size, generator=gen).tanh()
    print(f"\n## FSA layer: x {list(x.shape)}, kernel {list(kernel.shape)}, release map, {heads} heads\n")
    rows = []
    for direction in ("horizontal", "vertical"):
        want = None
        naive = None
        for name, fn in fsa_variants().items():
            with torch.inference_mode():
                y = fn(x, kernel, RELEASE_MAP, heads, direction)
            if want is None:
                want = y.double()
            lat = cpu_latency(lambda t, fn=fn: fn(t, kernel, RELEASE_MAP, heads, direction), x, repeats=repeats)
            naive = naive or lat["median"]
            rows.append(
                (
                    direction,
                    name,
                    f"{lat['median'] * 1e3:.1f} ms",
                    f"{lat['min'] * 1e3:.1f} ms",
                    f"{lat['cpu_median'] * 1e3:.1f} ms",
                    f"{naive / lat['median']:.1f}x",
                    f"{(y.double() - want).abs().max():.1e}",
                )
            )
    print_table(rows, ["direction", "implementation", "wall median", "wall min", "CPU median", "vs per tap", "max |diff|"])


def bench_model(size: int, repeats: int) -> None:
    from archs.fsa import fsa_spatial
    from archs.lamnet import LAMNet_base

    model = LAMNet_base(4).eval()
    x = torch.rand(1, 3, size, size)
    print(f"\n## LAMNet base x4 ({count_params(model):,} params), input {size}x{size} -> {4 * size}x{4 * size}\n")
    lat = cpu_latency(model, x, repeats=repeats)
    # the 48 FSA calls of one forward pass (24 mixers x 2 directions) at the feature size
    feats = torch.randn(1, 32, size, size)
    kernel = torch.randn(1, 52, size, size).tanh()
    fsa = {
        d: cpu_latency(lambda t, d=d: fsa_spatial(t, kernel, RELEASE_MAP, 4, d), feats, repeats=repeats)["median"]
        for d in ("horizontal", "vertical")
    }
    fsa_total = 24 * (fsa["horizontal"] + fsa["vertical"])
    rows = [
        ("whole forward", f"{lat['median'] * 1e3:.0f} ms", f"{lat['min'] * 1e3:.0f} ms", f"{lat['cpu_median'] * 1e3:.0f} ms"),
        ("48 FSA calls (timed alone)", f"{fsa_total * 1e3:.0f} ms", "-", "-"),
    ]
    print_table(rows, ["", "wall median", "wall min", "CPU median"])
    print(f"FSA share of the forward pass: about {100 * fsa_total / lat['median']:.0f}%")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="FSA feature map side (default 256)")
    parser.add_argument("--model-size", type=int, default=128, help="LAMNet input side (default 128; 0 skips)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD") if k in os.environ}
    print(f"# FSA benchmark; {machine_note()}")
    print(f"# allocator settings: {malloc or 'glibc defaults'}")
    bench_fsa(args.size, args.repeats)
    if args.model_size:
        bench_model(args.model_size, max(1, args.repeats // 2))


if __name__ == "__main__":
    main()
