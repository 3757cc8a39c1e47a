"""FlexNet benchmark: FlexNet x4 against ESRGAN x4 and against the machine's convolution limit, per size.

    python bench/bench_flexnet.py [--sizes 64,128,256] [--repeats 3] [--warmup 1] [--threads 1] [--meta]
                                  [--blas-linears]

Random weights, x4. For every input size one interleaved run (A, B, C, ... in turns, medians of process
CPU time, see :mod:`bench.common`) times:

* ``FlexNet fused``: FlexNet (linear, the defaults) after ``archs.fuse`` (what the Fuse node gives);
* ``FlexNet as loaded``: the same weights through ``archs.load_model`` with no Fuse node (inference is
  fused by itself: the two should match);
* ``ESRGAN``: spandrel's RRDBNet, 23 blocks, 64 features (nothing to fuse);
* ``conv3x3``: one plain 64 -> 64 3x3 convolution on a channels-last map of the input's size, the
  "convolution limit": a model's GMAC/s is printed as a share of its GMAC/s.

Ratios are FlexNet fused against ESRGAN (fused against fused: ESRGAN has nothing to fuse), by CPU time.
``--meta`` adds MetaFlexNet (fused) to each run. ``--blas-linears`` adds ``FlexNet fused, BLAS linears``:
the same model with :func:`archs.blocks.fast_linear` sent to ``F.linear`` (the BLAS matmul it used before
its linears moved to oneDNN), for that change's A/B in one run. MACs are FlopCounterMode FLOPs / 2 at the same size.
``--kept-heap`` runs everything inside ``nodes/heap.py``'s ``kept_heap()``, as the upscale engine runs
models on a CPU (glibc keeps freed activation memory during the run instead of page-faulting it in again).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import archs  # noqa: E402
from archs import blocks  # noqa: E402
from archs.flexnet import FlexNet, MetaFlexNet  # noqa: E402
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


def esrgan_x4() -> torch.nn.Module:
    from spandrel.architectures.ESRGAN import ESRGAN

    return ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4)


def blas_linears(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with ``archs.blocks.fast_linear`` falling back to ``F.linear`` (oneDNN's matmul off)."""
    saved, blocks._ONEDNN_LINEAR = blocks._ONEDNN_LINEAR, None
    try:
        return model(x)
    finally:
        blocks._ONEDNN_LINEAR = saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,128,256", help="input sides in pixels, comma-separated (default 64,128,256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model and size (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--meta", action="store_true", help="also time MetaFlexNet (fused)")
    parser.add_argument("--blas-linears", action="store_true",
                        help="also time FlexNet fused with its linears on F.linear (BLAS) instead of oneDNN")
    parser.add_argument("--kept-heap", action="store_true", help="run inside the engine's kept_heap() (glibc)")
    args = parser.parse_args(argv)
    heap = load_heap_module()
    with heap.kept_heap(args.kept_heap) as kept:
        run(args, kept)


def run(args, kept: bool) -> None:
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    torch.manual_seed(0)
    flex = archs.fuse(FlexNet()).eval()
    loaded = archs.load_model(flex.state_dict()).model  # same weights, no Fuse node
    assert not any(m.fused for m in archs.fusable_modules(loaded))
    models = {"FlexNet fused": flex, "FlexNet as loaded": loaded, "ESRGAN": esrgan_x4().eval()}
    if args.meta:
        models["MetaFlexNet fused"] = archs.fuse(MetaFlexNet()).eval()

    print(f"# FlexNet x4 benchmark; {machine_note()}")
    print(f"# interleaved runs, median of {args.repeats} (after {args.warmup} warm-up round) of process CPU time, "
          "inference_mode, fp32; GMAC/s = MACs / CPU time; 'limit' = a plain 64->64 3x3 conv in the same run; "
          f"glibc heap kept during the run (as in the engine): {'yes' if kept else 'no'}\n")
    print_table([[n, human(count_params(m))] for n, m in models.items()], ["model", "params"])

    summary = []
    for size in sizes:
        x = torch.rand(1, 3, size, size)
        conv, conv_macs = conv3x3_limit(size, size)
        candidates = {name: (lambda m=m: m(x)) for name, m in models.items()}
        candidates["conv3x3"] = conv
        macs = {name: count_macs(m, (1, 3, size, size)) for name, m in models.items()}
        macs["conv3x3"] = conv_macs
        if args.blas_linears:
            candidates["FlexNet fused, BLAS linears"] = lambda: blas_linears(flex, x)
            macs["FlexNet fused, BLAS linears"] = macs["FlexNet fused"]
        with torch.inference_mode():
            diff = (flex(x) - loaded(x)).abs().max().item()
        times = interleaved(candidates, repeats=args.repeats, warmup=args.warmup)
        limit = macs["conv3x3"] / times["conv3x3"]["cpu"]
        print(f"\n## {size}x{size} input ({load_average()} after the run); max|fused - as loaded| = {diff:.1e}")
        rows = []
        for name, t in times.items():
            rate = macs[name] / t["cpu"]
            rows.append([name, human(macs[name]), f"{t['cpu'] * 1e3:.1f}", f"{t['wall'] * 1e3:.1f}",
                         f"{rate / 1e9:.1f}", f"{100 * rate / limit:.0f}%"])
        print_table(rows, ["model", "MACs", "CPU ms", "wall ms", "GMAC/s", "of limit"])
        f, e = times["FlexNet fused"]["cpu"], times["ESRGAN"]["cpu"]
        if args.blas_linears:
            print(f"FlexNet fused with oneDNN linears: {times['FlexNet fused, BLAS linears']['cpu'] / f:.2f}x "
                  "the speed of the same model on BLAS linears (CPU time, this run)")
        summary.append([f"{size}x{size}", f"{e / f:.2f}x", f"{e / times['FlexNet as loaded']['cpu']:.2f}x",
                        f"{macs['ESRGAN'] / macs['FlexNet fused']:.2f}x",
                        f"{100 * macs['FlexNet fused'] / f / limit:.0f}%", load_average()])

    print("\n## FlexNet fused against ESRGAN x4, by CPU time in the same run")
    print_table(summary, ["input", "speed vs ESRGAN", "as loaded vs ESRGAN", "MAC ratio (ceiling)",
                          "FlexNet of conv limit", "load after"])


if __name__ == "__main__":
    main()
