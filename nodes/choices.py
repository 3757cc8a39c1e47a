"""``precision="auto"`` and ``compile="auto"`` on a CPU, decided by measuring on the running machine.

Hosts of one kind differ (one measured AVX-512 with native bf16, another Zen 3 with AVX2 only), so no fixed
list of families is right everywhere. The first time a network runs "auto" on a machine, this module times
it on a 64x64 crop of the image being upscaled:

- bf16: the network in bf16 autocast against fp32, interleaved, median of 3 calls each after a warm-up; bf16
  is used when it is at least :data:`BF16_MIN_SPEEDUP` faster and its output within :data:`BF16_MIN_PSNR`
  of fp32's (only on CPUs with native bf16, AVX512-BF16 or AMX, and for networks that support it);
- torch.compile: the network compiled for that crop against eager (the compile itself takes tens of seconds
  on a CPU, once); compiled is used when at least :data:`COMPILE_MIN_SPEEDUP` faster.

Decisions are kept per machine (CPU model and flags, torch version) and network (architecture, parameters,
scale) in memory and in ``decisions.json`` beside torch.compile's cache, so later runs and restarts decide at
once. Delete the file to measure again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

log = logging.getLogger("flexsr")

BF16_MIN_SPEEDUP = 1.10
BF16_MIN_PSNR = 45.0
COMPILE_MIN_SPEEDUP = 1.05
PROBE_SIDE = 64
FILE_NAME = "decisions.json"

_lock = threading.Lock()
_memory: dict[str, dict] = {}


def machine_key() -> str:
    """CPU model, the flags that matter for speed, torch version: decisions carry over only within it."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return f"{model} [{' '.join(f for f in wanted if f in flags)}] torch {torch.__version__} x{os.cpu_count()}"


def network_key(model) -> str:
    params = sum(p.numel() for p in model.model.parameters())
    return f"{getattr(model.architecture, 'id', type(model.model).__name__)} {params} x{model.scale}"


def decisions_file() -> Path:
    """``decisions.json`` beside torch.compile's on-disk cache (ComfyUI's user folder inside ComfyUI)."""
    from ..archs.compile import default_cache_dir
    from . import host

    folder = host.compile_cache_dir() or default_cache_dir()
    return Path(folder).parent / FILE_NAME


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remembered(kind: str, model, path: Optional[Path] = None) -> Optional[dict]:
    key = f"{kind} | {machine_key()} | {network_key(model)}"
    with _lock:
        if key in _memory:
            return _memory[key]
        found = _load(path or decisions_file()).get(key)
        if isinstance(found, dict):
            _memory[key] = found
        return found if isinstance(found, dict) else None


def remember(kind: str, model, decision: dict, path: Optional[Path] = None) -> None:
    key = f"{kind} | {machine_key()} | {network_key(model)}"
    path = path or decisions_file()
    with _lock:
        _memory[key] = decision
        try:
            data = _load(path)
            data[key] = decision
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError as e:  # a read-only home: the decision holds for this process
            log.debug("FlexSR: could not keep the decision in %s (%s)", path, e)


def probe_input(image: Tensor, channels: int, side: int = PROBE_SIDE) -> Tensor:
    """A ``[1, channels, side, side]`` crop from the middle of IMAGE ``[B, H, W, C]`` (repeated to size when the
    image is smaller), what the measurements run on."""
    x = image[:1].permute(0, 3, 1, 2).float()
    x = x[:, :channels] if x.shape[1] >= channels else x[:, :1].expand(1, channels, *x.shape[-2:])
    h, w = x.shape[-2:]
    if h < side or w < side:
        x = x.repeat(1, 1, math.ceil(side / h), math.ceil(side / w))
        h, w = x.shape[-2:]
    top, left = (h - side) // 2, (w - side) // 2
    return x[..., top:top + side, left:left + side].contiguous()


def _median_times(calls: dict[str, Callable[[], Tensor]], rounds: int = 3) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for name, call in calls.items():  # interleaved: A, B, A, B, ...
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _psnr(a: Tensor, b: Tensor) -> float:
    mse = float((a.float() - b.float()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@torch.inference_mode()
def measure_bf16(model, x: Tensor) -> dict:
    """Time ``model`` in bf16 autocast against fp32 on ``x`` and compare the outputs."""
    def fp32() -> Tensor:
        return model(x)

    def bf16() -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    ref, low = fp32(), bf16()  # warm-up, and the outputs compared
    t = _median_times({"fp32": fp32, "bf16": bf16})
    speedup, psnr = t["fp32"] / max(t["bf16"], 1e-9), _psnr(low.clamp(0, 1), ref.clamp(0, 1))
    return {"pays": speedup >= BF16_MIN_SPEEDUP and psnr >= BF16_MIN_PSNR, "speedup": round(speedup, 3),
            "psnr_db": round(psnr, 2) if math.isfinite(psnr) else 99.0, "measured": time.strftime("%Y-%m-%d")}


def bf16_pays(model, image: Tensor, native: bool, path: Optional[Path] = None,
              measure: Callable = measure_bf16) -> bool:
    """Whether "auto" should run ``model`` in bf16 on this CPU (measured once, then remembered)."""
    if not native or not model.supports_bfloat16:
        return False
    found = remembered("bf16", model, path)
    if found is None:
        found = measure(model, probe_input(image, model.input_channels))
        remember("bf16", model, found, path)
        log.info("FlexSR: precision auto measured %s: bf16 %.2fx fp32's speed, %.1f dB from it -> %s",
                 network_key(model), found["speedup"], found["psnr_db"], "bf16" if found["pays"] else "fp32")
    return bool(found["pays"])


def measure_compile(model, x: Tensor, cache_dir=None) -> dict:
    """Compile ``model``'s network for ``x`` and time it against eager."""
    from ..archs.compile import CompiledModel

    compiled = CompiledModel(model.model, max_shapes=1, cache_dir=cache_dir)
    with torch.inference_mode():
        start = time.perf_counter()
        compiled(x)
        took = time.perf_counter() - start
        if compiled.failed:
            return {"pays": False, "failed": compiled.failed, "measured": time.strftime("%Y-%m-%d")}
        model.model(x)  # eager warm-up
        t = _median_times({"eager": lambda: model.model(x), "compiled": lambda: compiled(x)})
    speedup = t["eager"] / max(t["compiled"], 1e-9)
    return {"pays": speedup >= COMPILE_MIN_SPEEDUP, "speedup": round(speedup, 3), "compile_s": round(took, 1),
            "measured": time.strftime("%Y-%m-%d")}


def compile_pays(model, image: Tensor, cache_dir=None, path: Optional[Path] = None,
                 measure: Callable = measure_compile) -> bool:
    """Whether "auto" should run ``model`` compiled on this CPU (measured once, then remembered)."""
    found = remembered("compile", model, path)
    if found is None:
        log.info("FlexSR: compile auto: measuring %s compiled against eager on this machine (once; the compile "
                 "takes a while)", network_key(model))
        found = measure(model, probe_input(image, model.input_channels), cache_dir)
        remember("compile", model, found, path)
        log.info("FlexSR: compile auto measured %s: %s", network_key(model),
                 f"{found['speedup']:.2f}x eager -> {'compiled' if found['pays'] else 'eager'}" if "speedup" in found
                 else f"compile failed ({found.get('failed')}) -> eager")
    return bool(found["pays"])
