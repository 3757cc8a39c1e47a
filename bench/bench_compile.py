"""torch.compile per family: first-call cost (fresh and warm on-disk cache) and steady speed-up.

    nice -n 5 python bench/bench_compile.py [--size 64] [--repeats 5] [--only FlexNet,EIMN] [--threads 1]

For each family (small configs, x2, random weights, seeded) two fresh processes run, sharing one
temporary inductor cache folder (``TORCHINDUCTOR_CACHE_DIR``) made for that family:

1. *cold*: the model compiled through :func:`archs.compiled` and called once on a ``--size``² input
   (empty cache: tracing, code generation and the C++ compiler); then eager and compiled calls in turns
   (A, B, A, B, ...), medians of process CPU time: the steady speed-up, and each one's multiply-adds per
   second as a share of a plain 3x3 convolution's timed in the same turns (the machine's convolution
   limit, as in ``bench_sr_archs.py``); and the largest difference of the compiled output from the eager one;
2. *warm*: a new process compiling the same model for the same shape: what a restarted ComfyUI pays
   (the FX graph and AOT autograd caches hit; tracing still runs).

First-call cost is given as wall time and as CPU time of the process and the compiler processes it
waited for (``TORCHINDUCTOR_COMPILE_THREADS=1``: code is generated in-process, only the C++ compiler
runs beside it), which does not count waiting for a core on a loaded machine. The eager first call is
printed beside. The load average is printed with every row.

``--layout`` also plans the engine's tiles for a few image sizes, plain and uniform (edge windows
widened into the image, which the engine uses when compiling), and prints the distinct window shapes
(one compile each) and the extra window pixels the uniform plan computes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAMILIES = ("FlexNet", "MetaFlexNet", "LMLT", "LAMNet", "EIMN", "TransformerSR")


def build(family: str):
    """(description, network) of a small x2 config of ``family``, random weights (seed 0)."""
    import torch

    import archs
    from archs.eimn import EIMN_A
    from archs.lamnet import LAMNet_base
    from archs.lmlt import LMLT_tiny
    from archs.transformer_sr import SR

    torch.manual_seed(0)
    table = {
        "FlexNet": ("FlexNet x2 dim 32, blocks 3+3", lambda: archs.FlexNet(scale=2, dim=32, num_blocks=(3, 3))),
        "MetaFlexNet": ("MetaFlexNet x2 dim 24, blocks 1/1/1/1",
                        lambda: archs.MetaFlexNet(scale=2, dim=24, num_blocks=(1, 1, 1, 1))),
        "LMLT": ("LMLT_tiny x2", lambda: LMLT_tiny(scale=2)),
        "LAMNet": ("LAMNet_base x2", lambda: LAMNet_base(scale=2)),
        "EIMN": ("EIMN_A x2", lambda: EIMN_A(scale=2)),
        "TransformerSR": ("DaViT SR x2, 2 blocks, dim 128, w4 h8",
                          lambda: SR(factor=2, num_blocks=2, dim=128, window_size=4, num_heads=8)),
    }
    name, make = table[family]
    return name, make().eval()


def cpu_seconds() -> float:
    """CPU time of this process plus that of its finished child processes (the C++ compiler)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def child(family: str, size: int, repeats: int, threads: int, steady: bool) -> dict:
    import torch

    import archs
    from bench.common import conv3x3_limit, count_macs, interleaved, load_average

    torch.set_num_threads(threads)
    name, model = build(family)
    x = torch.rand(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    out: dict = {"family": family, "model": name, "params": sum(p.numel() for p in model.parameters())}
    with torch.inference_mode():
        start, start_cpu = time.perf_counter(), cpu_seconds()
        ref = model(x)
        out["eager_first_wall"], out["eager_first_cpu"] = time.perf_counter() - start, cpu_seconds() - start_cpu
        compiled = archs.compiled(model)
        start, start_cpu = time.perf_counter(), cpu_seconds()
        y = compiled(x)
        out["first_wall"], out["first_cpu"] = time.perf_counter() - start, cpu_seconds() - start_cpu
    out["failed"] = compiled.failed
    out["max_abs_diff"] = float((y.float() - ref.float()).abs().max())
    if steady and not compiled.failed:
        conv, conv_macs = conv3x3_limit(size, size)
        times = interleaved({"eager": lambda: model(x), "compiled": lambda: compiled(x), "conv3x3": conv},
                            repeats=repeats, warmup=1)
        out["eager_ms"] = times["eager"]["cpu"] * 1e3
        out["compiled_ms"] = times["compiled"]["cpu"] * 1e3
        out["speedup"] = times["eager"]["cpu"] / times["compiled"]["cpu"]
        limit = conv_macs / times["conv3x3"]["cpu"]  # the machine's convolution rate, MAC/s
        macs = count_macs(model, (1, 3, size, size))
        out["eager_share"] = macs / times["eager"]["cpu"] / limit
        out["compiled_share"] = macs / times["compiled"]["cpu"] / limit
    out["load"] = load_average()
    return out


def run_child(family: str, cache: str, args, steady: bool) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_COMPILE_THREADS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", family, "--size", str(args.size),
           "--repeats", str(args.repeats), "--threads", str(args.threads)] + ([] if steady else ["--no-steady"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"family": family, "failed": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def layout_table() -> None:
    """Distinct window shapes and window pixels of the engine's tile plans, plain and uniform."""
    from bench.bench_tiling import load_pack
    from bench.common import print_table

    tiles_module = load_pack().nodes.tiles
    Layout, plan_tiles = tiles_module.Layout, tiles_module.plan_tiles

    rows = []
    for (h, w), tile, align, overlap in [((512, 768), 256, 8, 32), ((720, 1280), 384, 16, 32),
                                        ((1080, 1920), 384, 16, 32), ((1000, 1500), 512, 64, 64)]:
        cells = []
        for uniform in (False, True):
            layout = Layout.for_model(align, overlap, uniform=uniform)
            tiles = plan_tiles(1, h, w, tile, layout)
            shapes = {t.window_shape for t in tiles}
            pixels = sum(a * b for a, b in (t.window_shape for t in tiles))
            cells.append((len(tiles), len(shapes), pixels))
        (n, s_plain, p_plain), (_, s_uni, p_uni) = cells
        rows.append([f"{w}x{h}", f"{tile} (grid {align}, overlap {overlap})", n, s_plain, s_uni,
                     f"{100 * (p_uni / p_plain - 1):+.1f}%"])
    print("\nTile plans (engine layout), distinct window shapes = compiles per run:")
    print_table(rows, ["image", "tile", "tiles", "shapes plain", "shapes uniform", "uniform extra pixels"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="input side in pixels (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed calls per candidate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated families (default: all)")
    parser.add_argument("--layout", action="store_true", help="also print the tile-plan shapes table")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--no-steady", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.size, args.repeats, args.threads, not args.no_steady)), flush=True)
        return

    import torch

    from bench.common import load_average, machine_note, print_table

    torch.set_num_threads(args.threads)  # as the children run (for the header's note)
    families = [f.strip() for f in args.only.split(",") if f.strip()] or list(FAMILIES)
    unknown = set(families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    print(f"# torch.compile vs eager on CPU, {args.size}x{args.size} input, x2; {machine_note()}")
    print(f"# steady: interleaved, median of {args.repeats} process CPU times; first call: fresh process, "
          f"wall s / CPU s (with the C++ compiler)\n", flush=True)
    rows = []
    for family in families:
        with tempfile.TemporaryDirectory(prefix="flexsr_inductor_") as cache:
            cold = run_child(family, cache, args, steady=True)
            warm = run_child(family, cache, args, steady=False) if not cold.get("failed") else {}
        if cold.get("failed"):
            rows.append([family, cold.get("model", "-"), "failed", "-", "-", "-", "-", "-", "-", "-", load_average()])
            print(f"  {family}: compile failed: {cold['failed']}", flush=True)
            continue
        rows.append([
            family, cold["model"], f"{cold['eager_first_wall']:.2f} / {cold['eager_first_cpu']:.2f}",
            f"{cold['first_wall']:.1f} / {cold['first_cpu']:.1f}",
            f"{warm.get('first_wall', float('nan')):.1f} / {warm.get('first_cpu', float('nan')):.1f}",
            f"{cold['eager_ms']:.1f}", f"{cold['compiled_ms']:.1f}", f"{cold['speedup']:.2f}x",
            f"{100 * cold['eager_share']:.0f}% / {100 * cold['compiled_share']:.0f}%",
            f"{cold['max_abs_diff']:.1e}", cold["load"],
        ])
        print(f"  {family}: cold {cold['first_wall']:.1f} s, warm {warm.get('first_wall', float('nan')):.1f} s, "
              f"steady {cold['speedup']:.2f}x ({cold['load']})", flush=True)
    print()
    print_table(rows, ["family", "config", "eager 1st call s", "compiled 1st call, fresh cache", "... warm cache",
                       "eager ms", "compiled ms", "speed-up", "of conv limit (eager / compiled)", "max |diff|",
                       "load (child)"])
    if args.layout:
        layout_table()


if __name__ == "__main__":
    main()
