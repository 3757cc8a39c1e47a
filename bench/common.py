"""Helpers shared by FlexSR's benchmark scripts: parameter and MAC counts, CPU latency, a table printer.

Benchmarks print figures; nothing here asserts anything about speed.

* MACs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts FLOPs of matmuls,
  convolutions and attention (``scaled_dot_product_attention``) as 2 per multiply-accumulate; we report
  ``MACs = FLOPs / 2``. Element-wise ops, norms, activations, softmax, padding and resampling
  (``grid_sample``, ``interpolate``) are not counted, as in the usual SR papers' MAC figures.
  Counting runs on the ``meta`` device by default (shapes only, no arithmetic), so a 256x256 count of
  a large model takes a second.
* Latency is the median wall time (and the median process CPU time) of ``repeats`` forward passes
  after ``warmup`` passes, under ``torch.inference_mode()``, on whatever CPU threads torch is set to use.
* Comparisons use :func:`interleaved`: the candidates run in turns (A, B, A, B, ...) in one process and
  each one's median process CPU time is reported, so a change in the machine's load (it is shared) hits
  every candidate alike. Ratios are taken from those CPU-time medians; the load average is printed beside.
* The "convolution limit" (:func:`conv3x3_limit`) is a plain 64 -> 64 3x3 convolution on a channels-last
  feature map of the same size, timed in the same interleaved run: its GMAC/s is what this machine's
  best-tuned kernel reaches, and a model's GMAC/s is reported as a share of it.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``); buffers are not counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: torch.nn.Module, input_shape: Sequence[int], on_meta: bool = True) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on an input of ``input_shape`` ([B, C, H, W]).

    ``FlopCounterMode``'s FLOPs / 2. With ``on_meta`` the count runs on a meta-device copy of the model
    (fast, no memory for activations); if the model cannot run on meta tensors, it falls back to a real
    CPU run on zeros.
    """
    if on_meta:
        try:
            with torch.device("meta"):
                x = torch.empty(*input_shape)
            return _count(copy.deepcopy(model).to("meta"), x)
        except (NotImplementedError, RuntimeError):
            pass
    return _count(model, torch.zeros(*input_shape))


def _count(model: torch.nn.Module, x: torch.Tensor) -> int:
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def cpu_latency(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    repeats: int = 5,
    warmup: int = 1,
) -> dict[str, float]:
    """Seconds per forward pass over ``repeats`` timed runs after ``warmup``.

    Returns ``{"median", "min", "max"}`` of wall time and ``"cpu_median"``, the median of this process's
    CPU time (``time.process_time``). On a machine shared with other jobs the wall time includes waiting
    for a core; with one torch thread the CPU time does not, so it is the steadier figure there (with
    several threads it adds up all of them).
    """
    if isinstance(model, torch.nn.Module):
        model.eval()
    wall, cpu = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(max(1, repeats)):
            start, start_cpu = time.perf_counter(), time.process_time()
            model(x)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {"median": statistics.median(wall), "min": min(wall), "max": max(wall), "cpu_median": statistics.median(cpu)}


def interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """Time zero-argument callables in turns (A, B, C, A, B, C, ...), under ``torch.inference_mode()``.

    Returns, per name, ``{"cpu": median process CPU seconds, "wall": median wall seconds, "cpu_min",
    "cpu_max", "runs"}``. With one torch thread the CPU time does not count time spent waiting for a core,
    so it is the steady figure on a shared machine; interleaving spreads load changes over all candidates.
    """
    cpu: dict[str, list[float]] = {k: [] for k in candidates}
    wall: dict[str, list[float]] = {k: [] for k in candidates}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in candidates.values():
                fn()
        for _ in range(max(1, repeats)):
            for name, fn in candidates.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                cpu[name].append(time.process_time() - start_cpu)
                wall[name].append(time.perf_counter() - start)
    return {
        k: {"cpu": statistics.median(cpu[k]), "wall": statistics.median(wall[k]), "cpu_min": min(cpu[k]),
            "cpu_max": max(cpu[k]), "runs": len(cpu[k])}
        for k in candidates
    }


def conv3x3_limit(height: int, width: int, channels: int = 64, calls: int = 16) -> tuple[Callable[[], object], int]:
    """(a callable running a plain ``channels -> channels`` 3x3 conv ``calls`` times on a channels-last
    ``[1, C, H, W]`` map, its MACs): time it with :func:`interleaved` beside a model to get the machine's
    convolution limit. Several calls per timing keep one sample long enough to be steady."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).eval()
    x = torch.rand(1, channels, height, width).contiguous(memory_format=torch.channels_last)

    def run() -> None:
        for _ in range(calls):
            conv(x)

    return run, calls * channels * channels * 9 * height * width


def load_average() -> str:
    """``"load 1.2 / 0.9 / 0.7"`` (1, 5, 15 minutes), or ``"load n/a"``."""
    if not hasattr(os, "getloadavg"):
        return "load n/a"
    return "load " + " / ".join(f"{v:.1f}" for v in os.getloadavg())


def human(n: float, unit: str = "") -> str:
    """``3045136 -> '3.05 M'``, ``1.4e11 -> '143.5 G'``."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.{1 if factor >= 1e9 else 2}f} {prefix}{unit}"
    return f"{n:g} {unit}".strip()


def print_table(rows: Iterable[Sequence[object]], headers: Sequence[str]) -> str:
    """Print (and return) a plain-text table; numbers right-aligned, everything else left-aligned."""
    body = [[_cell(c) for c in row] for row in rows]
    numeric = [bool(body) and all(_is_number(r[i]) for r in body) for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str], align: Sequence[bool]) -> str:
        return "  ".join(c.rjust(w) if a else c.ljust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    out = [line(headers, [False] * len(headers)), "  ".join("-" * w for w in widths)]
    out += [line(r, numeric) for r in body]
    text = "\n".join(out)
    print(text)
    return text


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _is_number(text: str) -> bool:
    if text in ("-", ""):  # a placeholder does not make a numeric column textual
        return True
    try:
        float(text.replace(",", "").replace("x", "").split()[0])
        return True
    except (ValueError, IndexError):
        return False


#: The CPU features the speed of this pack's kernels depends on (lscpu / /proc/cpuinfo flag names).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_info() -> str:
    """The CPU model and the flags that matter here, e.g. ``Intel(R) Xeon(R) Processor [avx2 fma avx512f
    avx512_bf16 amx_bf16]`` (``no avx512`` / ``no native bf16`` said plainly where they are missing)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    have = [f for f in CPU_FLAGS if f in flags]
    if flags and "avx512f" not in flags:
        have.append("no avx512")
    if flags and not {"avx512_bf16", "amx_bf16"} & flags:
        have.append("no native bf16")
    return f"{model} [{' '.join(have) or 'flags unknown'}]"


def machine_note() -> str:
    """One line on where the figures were taken (CPU model and flags, threads, load, versions)."""
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{cpu_info()}; {os.cpu_count()} CPU cores visible, torch threads "
        f"{torch.get_num_threads()}; load average {load}; torch {torch.__version__}, python {platform.python_version()}"
    )


__all__ = [
    "count_params", "count_macs", "cpu_latency", "interleaved", "conv3x3_limit", "load_average", "human",
    "print_table", "machine_note", "cpu_info",
]


def load_heap_module():
    """``nodes/heap.py`` on its own (the nodes package needs the pack's relative imports): its
    ``kept_heap()`` lets a benchmark run models as the upscale engine does on a CPU."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flexsr_heap", Path(__file__).resolve().parents[1] / "nodes" / "heap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
