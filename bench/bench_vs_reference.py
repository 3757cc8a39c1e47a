"""FlexNet, LMLT and the DaViT-style SR transformer against their reference implementations, side by side.

    python bench/bench_vs_reference.py --ref-dir DIR [--family flexnet lmlt davit] [--sizes 64 128] [--repeats 5]

``DIR`` holds the reference sources, fetched by you and never part of this repository: umzi2/FlexNet's
``FlexNet_arch.py``, jwgdmkj/LMLT's ``LMLT.py`` and Craap/models' ``modules/attention.py`` (found anywhere
below ``DIR`` by those names; a checkout of each repository under ``DIR`` works). FlexNet (linear ×4, the
defaults) and MetaFlexNet (``pipeline_type="meta"``) run as ``archs.load_model`` returns them (no Fuse
node), the reference as it runs in eval mode (it fuses its OmniShifts itself). LMLT's only foreign import,
``basicsr.utils.registry.ARCH_REGISTRY``, is satisfied by a stub whose ``register()`` returns the class.

For each family, scale and LR size, both models get the same random weights (FlexSR's model is built,
its norm weights and biases perturbed, and its state dict loaded strictly into the reference), their outputs on
one input are compared (max abs difference; must be <= 1e-4), and then they run interleaved
(reference, FlexSR, reference, ...) on one torch thread in fp32 under ``torch.inference_mode()``; the
ratio is reference CPU time / FlexSR CPU time (medians of process CPU time), printed with the load
average. Sizes are multiples of 64, where the reference's LMLT is right (it crops its features before
the tail otherwise) and the transformer needs no padding.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import interleaved, load_average, machine_note, print_table  # noqa: E402

TOLERANCE = 1e-4


def _find(ref_dir: Path, name: str, parent: str | None = None) -> Path:
    hits = sorted(p for p in ref_dir.rglob(name) if parent is None or p.parent.name == parent)
    if not hits:
        where = f"{parent}/{name}" if parent else name
        raise SystemExit(f"--ref-dir {ref_dir}: no {where} below it (fetch the reference source there first).")
    return hits[0]


def _import(path: Path, module_name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_lmlt(ref_dir: Path) -> types.ModuleType:
    """jwgdmkj/LMLT ``LMLT.py``, with a stub for basicsr's registry."""
    if "basicsr.utils.registry" not in sys.modules:
        registry = types.ModuleType("basicsr.utils.registry")
        registry.ARCH_REGISTRY = types.SimpleNamespace(register=lambda *a, **k: (lambda cls: cls))
        for name in ("basicsr", "basicsr.utils"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["basicsr.utils.registry"] = registry
    return _import(_find(ref_dir, "LMLT.py"), "reference_lmlt")


def reference_flexnet(ref_dir: Path) -> types.ModuleType:
    """umzi2/FlexNet ``FlexNet_arch.py`` (torch and einops only)."""
    return _import(_find(ref_dir, "FlexNet_arch.py"), "reference_flexnet")


def reference_davit(ref_dir: Path) -> types.ModuleType:
    """Craap/models ``modules/attention.py``."""
    return _import(_find(ref_dir, "attention.py", parent="modules"), "reference_davit")


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm weights and biases moved off their initial values (by 0.1·N(0, 1)); weights keep their init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def pairs(ref_dir: Path, families: list[str], lmlt_size: str) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """(label, reference model, FlexSR model) with the same weights."""
    out = []
    if "flexnet" in families:
        import archs
        from archs.flexnet import FlexNet, MetaFlexNet

        ref = reference_flexnet(ref_dir)
        meta = {"pipeline_type": "meta", "dim": 48, "num_blocks": (4, 6, 6, 8)}  # the MetaFlexNet preset
        for label, cls, kwargs in (("FlexNet linear", FlexNet, {}), ("MetaFlexNet", MetaFlexNet, meta)):
            for scale in (4, 2):
                built = _perturb(cls(scale=scale), seed=20 + scale)
                ours = archs.load_model(built.state_dict()).model.eval()  # as loaded: no Fuse node
                theirs = ref.FlexNet(scale=scale, **kwargs).eval()
                theirs.load_state_dict(built.state_dict(), strict=True)
                out.append((f"{label} x{scale}", theirs, ours))
    if "lmlt" in families:
        from archs.lmlt import PRESETS, LMLT

        ref = reference_lmlt(ref_dir)
        for scale in (4, 2):
            ours = _perturb(LMLT(**PRESETS[lmlt_size], upscaling_factor=scale), seed=scale)
            theirs = ref.LMLT(**PRESETS[lmlt_size], upscaling_factor=scale).eval()
            theirs.load_state_dict(ours.state_dict(), strict=True)
            out.append((f"LMLT {lmlt_size} x{scale}", theirs, ours))
    if "davit" in families:
        from archs.transformer_sr import PUBLISHED, SR

        ref = reference_davit(ref_dir)
        for scale in (4, 2):
            config = {**PUBLISHED, "factor": scale}
            ours = _perturb(SR(**config), seed=10 + scale)
            theirs = ref.SR(**config).eval()
            theirs.load_state_dict(ours.state_dict(), strict=True)
            out.append((f"DaViT SR b8 d256 w4 h16 x{scale}", theirs, ours))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref-dir", type=Path, required=True, help="folder holding the reference sources")
    parser.add_argument("--family", nargs="+", choices=("flexnet", "lmlt", "davit"),
                        default=["flexnet", "lmlt", "davit"])
    parser.add_argument("--lmlt-size", choices=("tiny", "base", "large"), default="base")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="LR input sides (multiples of 64)")
    parser.add_argument("--scales", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# FlexSR vs reference; {machine_note()}")
    print(f"# interleaved (reference, FlexSR, ...), median process CPU time of {args.repeats} runs after "
          f"{args.warmup} warm-up, fp32, torch.inference_mode(), 1 thread\n")
    rows = []
    for label, theirs, ours in pairs(args.ref_dir.resolve(), args.family, args.lmlt_size):
        if int(label.rsplit("x", 1)[1]) not in args.scales:
            continue
        for size in args.sizes:
            x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
            with torch.inference_mode():
                diff = (theirs(x) - ours(x)).abs().max().item()
            if not diff <= TOLERANCE:
                raise SystemExit(f"{label} at {size}²: outputs differ by {diff:.3g} (> {TOLERANCE}); not timing.")
            t = interleaved({"ref": lambda: theirs(x), "ours": lambda: ours(x)},
                            repeats=args.repeats, warmup=args.warmup)
            rows.append((label, f"{size}x{size}", f"{t['ref']['cpu'] * 1000:.0f} ms",
                         f"{t['ours']['cpu'] * 1000:.0f} ms", f"{t['ref']['cpu'] / t['ours']['cpu']:.2f}x",
                         f"{diff:.1e}", load_average()))
            print(f"  {label} {size}²: {rows[-1][4]}", flush=True)
    print()
    print_table(rows, ["model", "LR input", "reference", "FlexSR", "speed-up (CPU time)", "max |diff|", "load"])


if __name__ == "__main__":
    main()
