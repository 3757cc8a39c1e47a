"""Training speed per family: optimisation steps per second at x2 and x4, one thread against every core.

    python bench/bench_train_speed.py [--steps 3] [--only EIMN_A,FlexNet] [--batch-size 8]

Each model takes the same steps ``training/finetune.py`` takes (AdamW, L1, gradient clipping, batch of
``--batch-size`` HR patches of 64 px at x2 and 128 px at x4, i.e. 32 px LR), with 1 torch thread and with
every core, interleaved (1, N, 1, N, ...), after one untimed step each. Reported: the median wall time of
a step, steps/s and img/s for each thread count, and which is faster right now: what ``--threads 0``
measures at the start of a run. The load average and the CPU are printed beside: on a busy machine one
thread is often faster (every extra thread waits at each barrier for a descheduled one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import cpu_info, load_average  # noqa: E402
from training.models import build_preset  # noqa: E402
from training.threads import cpu_cores  # noqa: E402

#: (label, preset, scale, keyword overrides): the shipped fine-tunes' family and the other presets.
CONFIGS = [
    ("FlexNet default x2 (39,772 params)", "FlexNet", 2,
     {"dim": 16, "num_blocks": (2, 2), "window_size": 8, "hidden_rate": 2, "upsampler": "ps"}),
    ("FlexNet x2 (dim 64)", "FlexNet", 2, {}),
    ("EIMN_A x2", "EIMN_A", 2, {}),
    ("EIMN_A x4", "EIMN_A", 4, {}),
    ("LMLT_tiny x2", "LMLT_tiny", 2, {}),
    ("LMLT_tiny x4", "LMLT_tiny", 4, {}),
    ("LAMNet_base x2", "LAMNet_base", 2, {}),
    ("DaViT SR x2 (4 blocks, dim 64)", "SR", 2, {"num_blocks": 4, "dim": 64, "window_size": 8, "num_heads": 4}),
]


def step_fn(model: torch.nn.Module, scale: int, batch: int):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr = torch.rand(batch, 3, 32, 32)
    hr = torch.rand(batch, 3, 32 * scale, 32 * scale)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = (model(lr) - hr).abs().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per thread count (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--only", default="", help="comma-separated label prefixes")
    args = ap.parse_args(argv)
    cores = cpu_cores()
    counts = [1, cores] if cores > 1 else [1]
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    load0 = load_average()
    print(f"batch {args.batch_size}, LR patches 32 px; {args.steps} timed steps per thread count, interleaved; "
          f"{cpu_info()}; load average {load0}")
    print(f"{'model':38s} {'params':>10s}  " + "  ".join(f"{c} thr s/step  steps/s  img/s" for c in counts)
          + "  faster")
    for label, preset, scale, kw in CONFIGS:
        if wanted and not any(label.startswith(w) for w in wanted):
            continue
        torch.manual_seed(0)
        model = build_preset(preset, scale, kw or None).train()
        params = sum(p.numel() for p in model.parameters())
        step = step_fn(model, scale, args.batch_size)
        times: dict[int, list[float]] = {c: [] for c in counts}
        for c in counts:  # one untimed step each
            torch.set_num_threads(c)
            step()
        for _ in range(args.steps):
            for c in counts:
                torch.set_num_threads(c)
                t = time.perf_counter()
                step()
                times[c].append(time.perf_counter() - t)
        med = {c: statistics.median(v) for c, v in times.items()}
        best = min(med, key=med.get)
        cells = "  ".join(f"{med[c]:12.2f}  {1 / med[c]:7.2f}  {args.batch_size / med[c]:5.1f}" for c in counts)
        print(f"{label:38s} {params:>10,}  {cells}  {best} thread{'s' if best > 1 else ''}", flush=True)
    print(f"load average {load0} at start, {load_average()} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
