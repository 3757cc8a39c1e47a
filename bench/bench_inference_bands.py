"""EIMN's and LAMNet's CPU inference band sizes, A/B in one process.

    python bench/bench_inference_bands.py [--sizes 64x64,128x128,96x768] [--repeats 5] [--threads 1]

Random weights, published configs (EIMN_A x2, LAMNet base x2), fp32, ``inference_mode``, inside
``nodes/heap.py``'s ``kept_heap()`` as the upscale engine runs models on a CPU. For each input size
(``HxW``; a wide strip such as ``96x768`` stands for the engine's 768 px CPU tiles) the variants of one
model run interleaved (A, B, C, ... in turns, medians of process CPU time, see :mod:`bench.common`):

* EIMN, ``archs.eimn.FFN_CHUNK`` (SADFFM's bands) 2048 (before) and the current value;
* LAMNet, ``archs.lamnet.FFN_CHUNK`` (DGFN's bands) 1024 (before) and the current value.

(Zero-padding EIMN's 170-wide FFN to 176 channels, oneDNN's 16-channel blocks, was tried with this
script too: 1.01-1.03x at 64² and 128², 0.99x on the strip; not kept.)

Speed-ups are against the first variant of each model; the outputs of all variants are compared with the
first one's (max abs difference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import interleaved, load_average, load_heap_module, machine_note, print_table  # noqa: E402

EIMN_CHUNK_BEFORE = 2048
LAMNET_CHUNK_BEFORE = 1024


def variants() -> dict[str, list[tuple[str, torch.nn.Module, dict]]]:
    """Per model, ``(label, network, settings)``: settings are module attributes set before each call."""
    from archs import eimn, lamnet

    torch.manual_seed(0)
    e = eimn.EIMN_A(scale=2).eval()
    la = lamnet.LAMNet_base(scale=2).eval()
    return {
        "EIMN_A x2": [
            (f"bands {EIMN_CHUNK_BEFORE}", e, {(eimn, "FFN_CHUNK"): EIMN_CHUNK_BEFORE}),
            (f"bands {eimn.FFN_CHUNK}", e, {(eimn, "FFN_CHUNK"): eimn.FFN_CHUNK}),
        ],
        "LAMNet base x2": [
            (f"bands {LAMNET_CHUNK_BEFORE}", la, {(lamnet, "FFN_CHUNK"): LAMNET_CHUNK_BEFORE}),
            (f"bands {lamnet.FFN_CHUNK}", la, {(lamnet, "FFN_CHUNK"): lamnet.FFN_CHUNK}),
        ],
    }


def call(model: torch.nn.Module, settings: dict, x: torch.Tensor):
    def run():
        saved = {key: getattr(*key) for key in settings}
        for (module, name), value in settings.items():
            setattr(module, name, value)
        try:
            return model(x)
        finally:
            for (module, name), value in saved.items():
                setattr(module, name, value)

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64x64,128x128,96x768", help="input sizes HxW, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",") if s.strip()]
    print(f"# EIMN / LAMNet inference band sizes; {machine_note()}")
    print(f"# interleaved, median of {args.repeats} process CPU times after 1 warm-up round; fp32, kept heap\n")
    rows = []
    with load_heap_module().kept_heap(True), torch.inference_mode():
        for model_name, options in variants().items():
            for h, w in sizes:
                x = torch.rand(1, 3, h, w)
                runs = {label: call(net, settings, x) for label, net, settings in options}
                first = next(iter(runs))
                reference = runs[first]()
                diffs = {label: float((run() - reference).abs().max()) for label, run in runs.items()}
                times = interleaved(runs, repeats=args.repeats, warmup=1)
                base = times[first]["cpu"]
                for label, t in times.items():
                    rows.append([model_name, f"{h}x{w}", label, f"{t['cpu'] * 1e3:.0f}", f"{base / t['cpu']:.3f}x",
                                 f"{diffs[label]:.1e}", load_average()])
    print_table(rows, ["model", "input", "variant", "CPU ms", "speed-up", "max |diff|", "load after"])


if __name__ == "__main__":
    main()
