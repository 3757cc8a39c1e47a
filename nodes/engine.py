"""The upscale engine: plain torch, used by the nodes, the benchmarks and the tests.

``upscale_image(model, image)`` takes a spandrel ``ImageModelDescriptor`` and a ComfyUI IMAGE
(float ``[B, H, W, C]`` in 0..1, C = 1, 3 or 4) and returns the upscaled IMAGE and a :class:`Report`.

How a run goes:
1. The image is checked (finite, 1/3/4 channels, H, W >= 1) and split into channel jobs
   (:mod:`.channels`: grey, RGB, RGBA with alpha by the model, by bicubic, or from a MASK).
2. Precision is chosen among those the model supports (:func:`resolve_precision`); the model runs under
   autocast, so its weights are never converted.
3. The tile size comes from free memory (CUDA device memory, or available RAM on CPU) and the model's
   size (:func:`auto_tile`), unless given. Tiles are planned by :mod:`.tiles`: even, aligned to the
   model's padding/window unit (:func:`alignment`), with context only where tiles meet.
4. Tiles of one window shape run in batches; each output is clamped, cropped and blended into the
   output tensor in place (:mod:`.blend`), so peak memory is input + output + one batch's working set.
5. On out-of-memory the batch is halved, then the tile size, and only the pending tiles are re-split:
   finished tiles stay. Below the floor size :class:`UpscaleOutOfMemoryError` is raised.
6. The cancel check runs before every model call and, through forward hooks on the model's modules
   (:mod:`.watch`), between modules inside it; progress is reported after every batch and, from the
   same hooks, every quarter second inside a model call.
7. A target scale below the model's is reached by an antialiased bicubic downscale of the result;
   above it, the model is applied again (at most :data:`MAX_PASSES` passes), then resized to the target.
8. ``compile`` ("off" / "auto" / "on", :func:`resolve_compile`) runs the network through
   :func:`archs.compile.compiled`: compiled once per window shape and kept with the network, so later
   tiles and runs reuse it. Windows are then uniform (edge windows widened into the image) and a short
   last batch is filled up to the batch size, so a run compiles one shape or few. While compiled, no
   hooks sit inside the model: progress moves and Cancel acts between model calls.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..archs.compile import CompiledModel, compiled
from ..archs.errors import BadImageError, FlexSRError, NonFiniteOutputError
from . import choices, host
from .blend import write_tile
from .channels import ALPHA_MODES, plan_channels
from .heap import kept_heap, run_on_heap
from .tiles import Layout, Tile, describe, plan_tiles, resplit, round_up
from .watch import ModuleWatch

log = logging.getLogger("flexsr")

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
COMPILE_MODES = ("off", "auto", "on")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_PASSES = 4
#: Smallest tile (px) the out-of-memory fallback goes down to.
MIN_TILE = 32
#: CPU working-set cap: larger tiles do not run faster on a CPU, they only take memory.
CPU_WORKSET = 2 << 30
MAX_BATCH = 16
#: CPU: an image that fits the working-set budget runs as one call (tiles only add context work there;
#: measured with bench/bench_tiling.py). One that does not is tiled with a working set of this share of
#: the pass's input + output bytes (at least CPU_TILED_FLOOR), so peak memory stays near input + output.
CPU_TILED_SHARE = 0.4
CPU_TILED_FLOOR = 256 << 20
#: ... and at least the working set of one tile of this side (px), where the context adds little work.
CPU_EFFICIENT_TILE = 384
#: A model with at least CPU_COSTLY_PARAMS parameters (roughly its multiply-adds per pixel) gets tiles of
#: at least CPU_CONTEXT_RATIO times the context: with 32 px of context, 384 px tiles compute 1.27x the
#: pixels of a 1536² image (ComfyUI's 512 px tiles with 32 px of overlap, 1.13x), and a FlexNet ran at
#: 0.89x ComfyUI's speed; 768 px tiles compute 1.085x (bench/bench_tiling.py). A cheap model keeps the
#: smaller tiles: its context costs little, and its working set stays small beside the output.
CPU_CONTEXT_RATIO = 24
CPU_COSTLY_PARAMS = 100_000
_ALIGN_ATTRS = ("tile_alignment", "pad_multiple", "pad_unit", "padding_multiple", "window_size", "split_size")


class UpscaleOutOfMemoryError(FlexSRError, MemoryError):
    """The model ran out of memory even on the smallest tile."""


class UpscaleSettingError(FlexSRError, ValueError):
    """A setting of the upscale is out of range (the message names it and its range)."""


#: The largest output scale asked for (the node's target_scale maximum).
MAX_SCALE = 16.0


@dataclass
class Report:
    """What a run did, for logs and the upscale node's UI."""

    input_size: tuple[int, int] = (0, 0)
    output_size: tuple[int, int] = (0, 0)
    batch_size: int = 0
    channels: str = ""
    device: str = "cpu"
    precision: str = "fp32"
    align: int = 1
    context: int = 0
    tile: int = 0
    batch: int = 1
    passes: int = 0
    tiles: int = 0
    model_calls: int = 0
    oom_retries: int = 0
    plan: str = ""
    compiled: str = ""
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        """The tile plan, precision and sizes, one fact per line (shown on the upscale node)."""
        (h, w), (oh, ow) = self.input_size, self.output_size
        parts = [self.plan] + ([f"+{self.context} px context, grid {self.align} px"] if self.context else []) + [
            f"{self.precision} on {self.device}, batch {self.batch}",
            f"{self.batch_size}× {w}×{h} → {ow}×{oh} {self.channels}",
        ]
        if self.passes > 1:
            parts.append(f"{self.passes} model passes")
        if self.oom_retries:
            parts.append(f"out of memory {self.oom_retries}× → tile {self.tile} px")
        if self.compiled:
            parts.append(self.compiled)
        return "\n".join(parts + self.notes)


# --------------------------------------------------------------------------------------------------
# Model facts


def alignment(model) -> int:
    """The model's padding/window unit: tile origins on multiples of it keep windows where they are.

    Read from spandrel's ``size_requirements.multiple_of``, the module's ``tile_alignment`` /
    ``pad_multiple`` / ``pad_unit`` / ``padding_multiple`` attributes and ``window_size`` /
    ``split_size`` (attribute or hyperparameter): their least common multiple, at most 256.
    """
    units = [model.size_requirements.multiple_of]
    module = model.model
    hp = getattr(module, "hyperparameters", None) or {}
    for name in _ALIGN_ATTRS:
        for value in (getattr(module, name, None), hp.get(name)):
            units.extend(_ints(value))
    u = 1
    for v in units:
        if 0 < v <= 256:
            u = math.lcm(u, v)
    return min(u, 256)


def _ints(value) -> list[int]:
    if isinstance(value, Tensor):
        return [int(v) for v in value.flatten().tolist()] if value.numel() <= 8 else []
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _ints(item)]
    return []


def grid_unit(model) -> int:
    """Tile grid for ``model``: its :func:`alignment`, raised to a multiple of 8 when smaller."""
    u = alignment(model)
    return u if u >= 8 else math.lcm(u, 8)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.model.parameters())


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.model.parameters()) + list(model.model.buffers()))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16): torch's check, else /proc/cpuinfo."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(requested: str, model, device: torch.device, image: Optional[Tensor] = None) -> torch.dtype:
    """The dtype to run in: ``requested`` when the model supports it, else the nearest it supports.

    "auto": fp16 on CUDA when supported, else bf16 when supported there, else fp32; on a CPU with native bf16,
    bf16 when this network measured faster in it on this machine with an output close to fp32's (measured once on
    a crop of ``image``, then remembered: :mod:`.choices`), else fp32.
    """
    if requested not in PRECISIONS:
        raise UpscaleSettingError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}.")
    half, bf16 = bool(model.supports_half), bool(model.supports_bfloat16)
    bf16_here = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if requested == "auto":
        if device.type == "cpu":
            if image is None or not bf16:
                return torch.float32
            return torch.bfloat16 if choices.bf16_pays(model, image, cpu_has_native_bf16()) else torch.float32
        if device.type != "cuda":
            return torch.float32
        return torch.float16 if half else torch.bfloat16 if bf16 and bf16_here else torch.float32
    if requested == "fp16" and not half:
        chosen = torch.bfloat16 if bf16 and bf16_here else torch.float32
        log.warning("FlexSR: %s does not support fp16; using %s.", model.architecture.name, NAMES[chosen])
        return chosen
    if requested == "bf16" and not (bf16 and bf16_here):
        log.warning("FlexSR: bf16 is not supported by %s here; using fp32.", model.architecture.name)
        return torch.float32
    return DTYPES[requested]


def resolve_compile(requested: str, model, device: torch.device, image: Optional[Tensor] = None,
                    cache_dir=None) -> bool:
    """Whether to run ``model`` compiled: "on" always, "off" never, "auto" on a CPU when this network measured
    faster compiled on this machine (once, on a crop of ``image``, then remembered: :mod:`.choices`); "auto"
    elsewhere: not yet measured, so not compiled."""
    if requested not in COMPILE_MODES:
        raise UpscaleSettingError(f"compile must be one of {', '.join(COMPILE_MODES)}, not {requested!r}.")
    if requested == "auto":
        if device.type != "cpu" or image is None:
            return False
        return choices.compile_pays(model, image, cache_dir)
    return requested == "on"


def describe_compiled(c: CompiledModel) -> str:
    """One line for the report: how the compiled model fared in this run."""
    if c.failed:
        return f"torch.compile failed → eager ({c.failed})"
    shapes = len(c.shapes)
    text = f"compiled, {shapes} shape{'s' if shapes != 1 else ''}"
    if c.eager_calls:
        text += f", {c.eager_calls} eager call{'s' if c.eager_calls != 1 else ''} (over {c.max_shapes} shapes)"
    return text


def estimate_bytes_per_pixel(model, dtype: torch.dtype) -> int:
    """A generous static estimate of one model call's working memory per input pixel.

    The widest layer's activations a dozen times over at input resolution, the same again for the
    layers that may run at output resolution, and the float32 output.
    """
    width = 1
    for m in model.model.modules():
        width = max(width, getattr(m, "out_channels", 0) or 0, getattr(m, "out_features", 0) or 0)
    width = min(width, 4096)
    elem = torch.empty((), dtype=dtype).element_size()
    s2 = model.scale**2
    return int(elem * width * (12 + 2 * s2) + 4 * model.output_channels * s2 * 3)


_BPP_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _cache(model) -> dict:
    """Measured costs of ``model``'s network, kept as long as the network lives (whatever wraps it)."""
    return _BPP_CACHE.setdefault(model.model, {})


@torch.inference_mode()
def measure_bytes_per_pixel(model, dtype: torch.dtype, device: torch.device, side: int) -> Optional[int]:
    """Working memory per input pixel of one model call, measured on a ``side``² probe.

    CUDA: the allocator's peak. CPU: forward hooks record every module's output; the three largest
    live at once, with half again for the allocator and whatever functional ops add, plus the output.
    None when the probe fails (the static estimate is used then).
    """
    cache = _cache(model)
    key = (str(dtype), device.type, side)
    if key in cache:
        return cache[key]
    x = torch.rand(1, model.input_channels, side, side, device=device, dtype=model.dtype)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            with _autocast(device, dtype, model.dtype):
                model(x)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
            bpp = int(peak * 1.25 / (side * side)) + 1
        else:
            sizes: list[int] = []

            def hook(_module, _inputs, output):
                if isinstance(output, Tensor):
                    sizes.append(output.numel() * output.element_size())

            handles = [m.register_forward_hook(hook) for m in model.model.modules()]
            try:
                with _autocast(device, dtype, model.dtype):
                    y = model(x)
            finally:
                for h in handles:
                    h.remove()
            top = sum(sorted(sizes, reverse=True)[:3])
            bpp = int((top * 1.5 + 2 * y.numel() * 4) / (side * side)) + 1
    except Exception as e:  # out of memory already, or an odd model: fall back to the estimate
        log.debug("FlexSR: memory probe failed: %s", e)
        if device.type == "cuda":
            host.empty_cache()
        return None
    cache[key] = bpp
    return bpp


def memory_budget(model, device: torch.device, dtype: torch.dtype, layout: Layout,
                  probe: bool = True, pixels: int = 0) -> tuple[float, int]:
    """(bytes the tiles may use, bytes per input pixel of a model call) on ``device``.

    With ``probe`` the per-pixel cost is measured (:func:`measure_bytes_per_pixel`, once per network,
    dtype and device), else estimated; on a CPU no probe runs when ``pixels`` (the whole image) fit the
    budget even at the generous static estimate.
    """
    if device.type == "cuda":
        budget = host.free_memory(device) * 0.8
        if model.device != device:
            budget -= model_bytes(model)
    else:
        budget = min(host.available_ram() * 0.4, CPU_WORKSET)
    estimate = estimate_bytes_per_pixel(model, dtype)
    if device.type == "cpu" and pixels and pixels * estimate <= budget:
        probe = False
    side = max(layout.align, 64 // layout.align * layout.align)
    bpp = (measure_bytes_per_pixel(model, dtype, device, side) if probe else None) or estimate
    return max(budget, 0.0), max(bpp, 1)


def auto_tile(budget: float, bpp: int, layout: Layout, height: int, width: int, batch_size: int,
              max_call_pixels: Optional[int] = None) -> int:
    """The largest tile whose window fits ``budget`` (and ``max_call_pixels``): the whole image when it fits."""
    pixels = budget / bpp
    if max_call_pixels:
        pixels = min(pixels, max_call_pixels)
    if height * width <= pixels:  # one call: a tile that covers the image even after rounding to the grid
        return round_up(max(height, width), layout.align)
    side = int(math.sqrt(pixels)) - 2 * layout.context
    return max(layout.min_tile(), side // layout.align * layout.align)


def auto_batch(budget: float, bpp: int, layout: Layout, tile: int, height: int, width: int,
               max_call_pixels: Optional[int] = None) -> int:
    """How many windows of ``tile`` (plus context) fit ``budget`` (and ``max_call_pixels``) at once."""
    wh = min(height, tile + 2 * layout.context)
    ww = min(width, tile + 2 * layout.context)
    pixels = budget / bpp
    if max_call_pixels:
        pixels = min(pixels, max_call_pixels)
    return int(max(1, min(MAX_BATCH, pixels // (wh * ww))))


# --------------------------------------------------------------------------------------------------
# Running tiles


def _autocast(device: torch.device, dtype: torch.dtype, model_dtype: torch.dtype):
    if dtype == model_dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _is_oom(e: BaseException, types: tuple) -> bool:
    if isinstance(e, types):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


class TileRunner:
    """Runs one model over tiles of ``[B, C, H, W]`` sources, blending into destinations in place."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype, layout: Layout, tile: int, batch: int,
                 report: Report, check_cancel: Callable[[], None], on_progress: Callable[[int], None],
                 on_partial: Optional[Callable[[int], None]] = None, compiled: Optional[CompiledModel] = None):
        self.model = model
        #: the network compiled per window shape (no hooks inside it then), or None to run it as it is
        self.compiled = compiled
        self.device = device
        self.dtype = dtype
        self.layout = layout
        self.tile = layout.tile_size(tile)
        self.batch = max(1, batch)
        self.report = report
        self.check_cancel = check_cancel
        self.on_progress = on_progress
        self.on_partial = on_partial  # input px of the running call done so far (from the module hooks)
        self.watch = ModuleWatch(model.model, check_cancel)
        self.oom = host.oom_types()
        self.floor = layout.tile_size(max(MIN_TILE, layout.min_tile()))
        self.used_batch = 1
        self.shape_batch: dict[tuple[int, int], int] = {}
        self.channels_last = True
        #: False while ``dst`` is uninitialised (a one-tile-per-image plan): zeroed before any re-split.
        self.dst_zeroed = True

    @torch.inference_mode()
    def run(self, src: Tensor, dst: Tensor, pre=None, post=None, adopt: bool = False) -> Optional[Tensor]:
        """``src`` [B, C, H, W] (any strides, CPU), ``dst`` [B, C', H*s, W*s] zero-filled, written in place.

        With ``adopt``, a single call on a single whole image whose output already has ``dst``'s shape,
        dtype, device and a channels-last layout is returned instead of copied into ``dst`` (None otherwise).
        """
        B, _, H, W = src.shape
        s = self.model.scale
        pending = plan_tiles(B, H, W, self.tile, self.layout)
        self.report.plan = describe(pending)
        self.report.context = self.layout.context if len(pending) > B else 0
        self._plan_batches(pending)
        while pending:
            self.check_cancel()
            group = self._take(pending)
            out_of_memory = False
            try:
                results = self._call(src, group, pre)
            except Exception as e:
                if not _is_oom(e, self.oom):
                    raise
                out_of_memory = True  # handled below, once the failed call's frames are released
            if out_of_memory:
                pending = self._shrink(pending, len(group), H, W)
                self._plan_batches(pending)
                if not self.dst_zeroed and len(pending) > len({t.index for t in pending}):
                    for index in {t.index for t in pending}:  # tiles of these images will crossfade
                        dst[index].zero_()
                    self.dst_zeroed = True
                continue
            if adopt and B == 1 and len(pending) == 1 and post is None and results.shape == dst.shape \
                    and results.dtype == dst.dtype and results.device == dst.device \
                    and results.is_contiguous(memory_format=torch.channels_last):
                self.report.tiles += 1
                self.on_progress(pending[0].core_area)
                self.report.batch = self.used_batch
                return results
            for tile, result in zip(group, results):
                if post is not None:  # the model's output is clamped already (spandrel's call)
                    result = post(result[None])[0].clamp_(0, 1)
                write_tile(dst, tile.index, tile, result, self.layout.blend, s, H, W)
            taken = {id(t) for t in group}
            pending = [t for t in pending if id(t) not in taken]
            self.report.tiles += len(group)
            self.used_batch = max(self.used_batch, len(group))
            self.on_progress(sum(t.core_area for t in group))
        self.report.batch = self.used_batch
        return None

    def _plan_batches(self, pending: Sequence[Tile]) -> None:
        """Compiled: the batch per window shape, even (n tiles in ceil(n / batch) calls of equal size), so
        each window shape is one compiled input shape (a short last call is filled up to it)."""
        self.shape_batch = {}
        if self.compiled is None:
            return
        counts: dict[tuple[int, int], int] = {}
        for t in pending:
            counts[t.window_shape] = counts.get(t.window_shape, 0) + 1
        for shape, n in counts.items():
            self.shape_batch[shape] = math.ceil(n / math.ceil(n / self.batch))

    def _take(self, pending: Sequence[Tile]) -> list[Tile]:
        shape = pending[0].window_shape
        return [t for t in pending if t.window_shape == shape][: self.shape_batch.get(shape, self.batch)]

    def _call(self, src: Tensor, group: list[Tile], pre) -> Tensor:
        windows = [src[t.index, :, t.y.lo : t.y.hi, t.x.lo : t.x.hi] for t in group]
        fill = self.shape_batch.get(group[0].window_shape, 0) if self.compiled is not None else 0
        if len(windows) < fill:  # a short last call is filled with its last window: one compiled shape, not two
            windows += [windows[-1]] * (fill - len(windows))
        if self.device.type == "cpu" and self.channels_last:  # one copy, straight into the layout fed
            x = torch.empty((len(windows), *windows[0].shape), dtype=self.model.dtype,
                            memory_format=torch.channels_last)
            for i, window in enumerate(windows):
                x[i].copy_(window)
        else:
            x = torch.stack(windows).to(self.device, self.model.dtype)
        if pre is not None:
            x = pre(x)
        self.report.model_calls += 1
        area = sum(t.core_area for t in group)
        self.watch.on_fraction = None if self.on_partial is None else (lambda f: self.on_partial(int(f * area)))
        hooks = self.watch.attached() if self.compiled is None else contextlib.nullcontext()
        if self.compiled is not None and self.compiled.will_compile(x):
            log.info("FlexSR: compiling %s for %s (once per shape; later tiles and runs reuse it)",
                     self.model.architecture.name, tuple(x.shape))
        with hooks:
            if self.compiled is None and self.on_partial is not None and not self.watch.probed:
                self._probe_watch(x)
            with self.watch.call(tuple(x.shape)):
                y = self._forward(x)
                if self.dtype != torch.float32 and not all_finite(y):
                    log.warning("FlexSR: %s overflowed; running in fp32 from here on.", NAMES.get(self.dtype))
                    self.report.notes.append(f"{NAMES.get(self.dtype)} overflowed → fp32")
                    self.dtype = torch.float32
                    self.report.precision = "fp32"
                    y = self._forward(x)
        if not all_finite(y):  # inputs are finite (check_image): the model produced NaN/Inf
            m = self.model
            arch = getattr(getattr(m, "architecture", None), "name", type(m).__name__)
            name = getattr(m, "flexsr_source", None) or f"{arch} ×{getattr(m, 'scale', '?')}"
            raise NonFiniteOutputError(
                f"The model {name} turned a finite image into NaN/Inf values (in {NAMES.get(self.dtype)}); "
                f"its weights are probably damaged. Nothing was returned."
            )
        return y[: len(group)]

    def _probe_watch(self, x: Tensor) -> None:
        """Let the watch count the hooks this model fires on two tiny crops of ``x`` (a few ms), so progress
        inside the first call rises smoothly to 100% (:meth:`.watch.ModuleWatch.probe`)."""
        side = max(16, 2 * self.layout.align)

        def run(n: int) -> None:
            crop = x[:1, :, :n, :n]
            if crop.shape[-2:] != (n, n):  # a small tile: the probe's input is made to size
                crop = F.interpolate(x[:1].float(), size=(n, n), mode="nearest").to(x.dtype)
            self._forward(crop)

        self.watch.probe(run, side)

    def _forward(self, x: Tensor) -> Tensor:
        """The model on ``x``, fed channels-last (faster convolutions on CPU and GPU) while the model copes."""
        if self.channels_last:
            try:
                return self._model_call(x.contiguous(memory_format=torch.channels_last))
            except RuntimeError as e:
                if "view" not in str(e) and "stride" not in str(e):
                    raise
                log.debug("FlexSR: %s needs contiguous input (%s)", self.model.architecture.name, e)
                self.channels_last = False
        return self._model_call(x.contiguous())

    def _model_call(self, x: Tensor) -> Tensor:
        """One model call; on a CPU in the heap thread (:func:`.heap.run_on_heap`: glibc's main arena, whose
        memory a run keeps, so layers do not page-fault their outputs in again), with this thread's torch
        modes and thread count."""
        def call() -> Tensor:
            with _autocast(self.device, self.dtype, self.model.dtype):
                return self._model(x)

        if self.device.type != "cpu":
            return call()
        threads, inference, grad = torch.get_num_threads(), torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def in_heap_thread() -> Tensor:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return call()

        return run_on_heap(in_heap_thread)

    def _model(self, x: Tensor) -> Tensor:
        """The descriptor's call (pad to its size needs, run, clamp to 0..1, crop), through the compiled
        network when there is one."""
        if self.compiled is None or self.compiled.failed:
            return self.model(x)
        h, w = x.shape[-2:]
        pad_w, pad_h = self.model.size_requirements.get_padding(w, h)
        if pad_w or pad_h:  # as spandrel pads: reflect as far as it reaches, then replicate
            rw, rh = min(pad_w, w - 1), min(pad_h, h - 1)
            x = F.pad(F.pad(x, (0, rw, 0, rh), "reflect"), (0, pad_w - rw, 0, pad_h - rh), "replicate")
        if self.model.model.training:
            self.model.model.eval()
        y = self.compiled(x).clamp_(0, 1)
        s = self.model.scale
        return y[..., : h * s, : w * s] if pad_w or pad_h else y

    def _shrink(self, pending: list[Tile], failed: int, H: int, W: int) -> list[Tile]:
        host.empty_cache()
        self.report.oom_retries += 1
        if failed > 1:
            self.batch = max(1, failed // 2)
            log.warning("FlexSR: out of memory with %d tiles per call; trying %d.", failed, self.batch)
            return pending
        if self.tile <= self.floor:
            raise UpscaleOutOfMemoryError(
                f"Out of memory on {self.device} even with {self.tile}px tiles "
                f"({self.tile + 2 * self.layout.context}px with context). Free memory (close other "
                f"models or programs), use a smaller overlap, precision fp16/bf16, or run on CPU."
            )
        self.tile = max(self.floor, self.layout.tile_size(self.tile // 2))
        log.warning("FlexSR: out of memory; continuing with %dpx tiles.", self.tile)
        pending = resplit(pending, H, W, self.tile, self.layout)
        self.report.tile = self.tile
        return pending


# --------------------------------------------------------------------------------------------------
# Images


def all_finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite, from one min/max pass (NaN and ±inf show in them): on a
    CPU 10-20x cheaper than ``torch.isfinite(t).all()``, whose checks of input and output took ~0.2 s of
    a 1.6 s ×4 upscale of a 1024² image (Compact, one thread; 25 ms this way)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        t = t.permute(0, 2, 3, 1)  # the same memory in order: no copy before the reduction
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_image(image) -> Tensor:
    """A ComfyUI IMAGE as float32 ``[B, H, W, C]``; anything else raises :class:`BadImageError`."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise BadImageError("No images were given.")
        items = [check_image(i) for i in image]
        sizes = {tuple(i.shape[1:]) for i in items}
        if len(sizes) > 1:
            listed = ", ".join(f"{w}×{h}×{c}" for h, w, c in sorted(sizes))
            raise BadImageError(
                f"The batch mixes image sizes ({listed}); a batch must hold images of one size. Resize them "
                f"to one size first, or upscale them one at a time."
            )
        return torch.cat(items)
    if not isinstance(image, Tensor):
        raise BadImageError(f"Expected an IMAGE tensor, got {type(image).__name__}.")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4:
        raise BadImageError(f"An IMAGE is [batch, height, width, channels]; this one has shape {tuple(image.shape)}.")
    if not image.is_floating_point():
        raise BadImageError(f"An IMAGE holds floats in 0..1; this one is {image.dtype}. Convert it first.")
    b, h, w, c = image.shape
    if b == 0 or h == 0 or w == 0:
        raise BadImageError(f"The image is empty (shape {tuple(image.shape)}).")
    if c not in (1, 3, 4):
        raise BadImageError(f"The image has {c} channels; FlexSR upscales grey (1), RGB (3) and RGBA (4) images.")
    if not all_finite(image):
        bad = int((~torch.isfinite(image)).sum())
        raise BadImageError(
            f"The image contains {bad} NaN or infinite value(s); fix the node that produced it "
            f"(e.g. clamp it) before upscaling."
        )
    return image.float()


def attach_mask(image: Tensor, mask: Optional[Tensor], invert: bool = True) -> Tensor:
    """RGB(A) ``image`` with its alpha replaced by ``mask`` ([B or 1, H, W], resized if needed).

    ComfyUI masks mark transparency (Load Image's MASK is 1 - alpha), so ``invert`` gives alpha = 1 - mask.
    """
    if mask is None:
        return image
    if not isinstance(mask, Tensor) or mask.dim() not in (2, 3):
        raise BadImageError(f"A MASK is [batch, height, width]; got {getattr(mask, 'shape', type(mask).__name__)}.")
    mask = mask[None] if mask.dim() == 2 else mask
    if mask.numel() == 0:
        raise BadImageError(f"The mask is empty ({'×'.join(map(str, mask.shape))}); give one of the image's size, or "
                            f"none.")
    if not mask.is_floating_point():
        mask = mask.float()
    if not all_finite(mask):
        raise BadImageError("The mask contains NaN or infinite values.")
    b, h, w, c = image.shape
    if mask.shape[0] not in (1, b):
        raise BadImageError(f"The mask batch ({mask.shape[0]}) must be 1 or the image batch ({b}).")
    mask = mask.float()
    if mask.shape[1:] != (h, w):
        mask = F.interpolate(mask[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    alpha = (1.0 - mask if invert else mask).clamp(0, 1).expand(b, h, w)[..., None]
    rgb = image[..., :3] if c >= 3 else image[..., :1].expand(b, h, w, 3)
    return torch.cat([rgb, alpha], -1)


def resize(image: Tensor, height: int, width: int) -> Tensor:
    """Antialiased bicubic resize of ``[B, H, W, C]``, one image at a time, clamped to 0..1."""
    out = torch.empty(image.shape[0], image.shape[3], height, width, dtype=image.dtype)
    for i in range(image.shape[0]):
        x = image[i : i + 1].permute(0, 3, 1, 2)
        y = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        out[i] = y.clamp_(0, 1)[0]
    return out.permute(0, 2, 3, 1)


class _Progress:
    def __init__(self, total: int, callback: Optional[Callable[[int, int], None]]):
        self.total = max(1, total)
        self.done = 0
        self.shown = 0
        self.callback = callback

    def add(self, amount: int) -> None:
        self.done = min(self.total, self.done + amount)
        self._show(self.done)

    def partial(self, amount: int) -> None:
        """``amount`` more of the running model call is done (not committed; never shown going back)."""
        self._show(min(self.total, self.done + amount))

    def _show(self, value: int) -> None:
        if value < self.shown:
            return
        self.shown = value
        if self.callback is not None:
            self.callback(value, self.total)


def _passes(model_scale: int, target: float) -> int:
    if target <= model_scale or model_scale <= 1:
        return 1
    n = 1
    while model_scale**n < target - 1e-6 and n < MAX_PASSES:
        n += 1
    return n


def upscale_image(
    model,
    image,
    *,
    tile_size: int = 0,
    overlap: int = 32,
    precision: str = "auto",
    target_scale: float = 0.0,
    alpha_mode: str = "model",
    mask: Optional[Tensor] = None,
    invert_mask: bool = True,
    device: Optional[torch.device | str] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    check_cancel: Optional[Callable[[], None]] = None,
    compile: str = "off",
    compile_cache: Optional[str] = None,
    ensemble: bool = False,
) -> tuple[Tensor, Report]:
    """Upscale a ComfyUI IMAGE ``[B, H, W, C]`` (0..1) with a spandrel ``ImageModelDescriptor``.

    ``tile_size``: core tile size in input px, 0 = automatic. ``overlap``: context px around each tile
    where tiles meet (rounded up to the model's grid; half of it crossfades). ``target_scale``: 0 = the
    model's scale. ``compile``: "off", "on" or "auto" (:func:`resolve_compile`); ``compile_cache``: the
    folder for torch.compile's on-disk caches (:func:`archs.compile.use_cache_dir`; default
    ``~/.cache/flexsr/torch_compile``; ``TORCHINDUCTOR_CACHE_DIR`` wins when set). ``ensemble``: upscale the
    8 flips and quarter turns of the image and average the results, each turned back exactly (x8 the time;
    tiling, alpha and masks as in a plain run). Returns (IMAGE ``[B, H', W', C']`` float32 on CPU,
    :class:`Report`).
    """
    image = check_image(image)
    image = attach_mask(image, mask, invert_mask)
    if alpha_mode not in ALPHA_MODES:
        raise UpscaleSettingError(f"alpha_mode must be one of {', '.join(ALPHA_MODES)}, not {alpha_mode!r}.")
    if not isinstance(target_scale, (int, float)) or not math.isfinite(target_scale) or not 0 <= target_scale <= MAX_SCALE:
        raise UpscaleSettingError(f"target_scale must be 0 (the model's scale) or up to {MAX_SCALE:g}, not "
                                  f"{target_scale!r}.")
    device = torch.device(device) if device is not None else host.torch_device()
    check_cancel = check_cancel or host.check_interrupted
    dtype = resolve_precision(precision, model, device, image)
    use_compile = resolve_compile(compile, model, device, image, compile_cache)
    compiled_model = compiled(model, cache_dir=compile_cache) if use_compile else None

    b, h, w, c = image.shape
    scale = model.scale
    target = target_scale if target_scale > 0 else float(scale)
    passes = _passes(scale, target)
    report = Report(input_size=(h, w), batch_size=b, device=str(device), precision=NAMES[dtype],
                    passes=passes, channels={1: "grey", 3: "RGB", 4: "RGBA"}[c])
    unit = grid_unit(model)
    report.align = unit

    # progress in input pixels of model work, summed over passes and channel jobs
    def work(hh: int, ww: int, img_c: int) -> int:
        jobs = plan_channels(img_c, model.input_channels, model.output_channels, alpha_mode)
        return sum(b * hh * ww for j in jobs if j.kind == "model")

    total, hh, ww, cc = 0, h, w, c
    for _ in range(passes):
        total += work(hh, ww, cc)
        hh, ww = hh * scale, ww * scale
        cc = len({d for j in plan_channels(cc, model.input_channels, model.output_channels, alpha_mode) for d in j.dst})
    views = ENSEMBLE_VIEWS if ensemble else 1
    tracker = _Progress(total * views, progress)
    out_h, out_w = max(1, round(h * target)), max(1, round(w * target))

    original_device = model.device
    host.make_room(model_bytes(model) + image.numel() * 4 * max(1, scale) ** 2, device)
    try:
        model.to(device)
        summed = None
        with kept_heap(device.type == "cpu"):  # fewer page faults between layers; memory handed back after
            for view in range(views):
                current = dihedral(image, view) if views > 1 else image
                for _ in range(passes):
                    current = _one_pass(model, current, device, dtype, tile_size, overlap, alpha_mode, report,
                                        check_cancel, tracker, compiled_model)
                if views == 1:
                    break
                current = undo_dihedral(current, view)
                summed = current.clone() if summed is None else summed.add_(current)
        if views > 1:
            current = summed.div_(views)
            report.notes.append(f"ensemble: {views} flips/turns averaged")
    finally:
        model.to(original_device)
        if device.type == "cuda":
            host.empty_cache()

    if compiled_model is not None:
        report.compiled = describe_compiled(compiled_model)
    tracker.add(tracker.total)  # jobs that needed no model (constant alpha) count as done
    if (out_h, out_w) != tuple(current.shape[1:3]):
        current = resize(current, out_h, out_w)
    report.output_size = (out_h, out_w)
    return current, report


#: The self-ensemble's views: the 8 symmetries of the square (4 quarter turns, each with and without a flip).
ENSEMBLE_VIEWS = 8


def dihedral(image: Tensor, view: int) -> Tensor:
    """View ``view`` (0..7) of an IMAGE ``[B, H, W, C]``: ``view & 3`` quarter turns, then a left-right flip
    when ``view & 4``. Exact (a permutation of pixels); contiguous."""
    out = torch.rot90(image, view & 3, dims=(1, 2))
    if view & 4:
        out = out.flip(2)
    return out.contiguous()


def undo_dihedral(image: Tensor, view: int) -> Tensor:
    """The inverse of :func:`dihedral`: ``undo_dihedral(dihedral(x, v), v) == x`` exactly."""
    out = image.flip(2) if view & 4 else image
    return torch.rot90(out, -(view & 3), dims=(1, 2)).contiguous()


def _one_pass(model, image: Tensor, device, dtype, tile_size, overlap, alpha_mode, report: Report,
              check_cancel, tracker: _Progress, compiled_model: Optional[CompiledModel] = None) -> Tensor:
    b, h, w, c = image.shape
    s = model.scale
    alpha_value = None
    if c == 4:
        a = image[..., 3]
        if bool((a.max() - a.min()) == 0):
            alpha_value = float(a.flatten()[0])
    jobs = plan_channels(c, model.input_channels, model.output_channels, alpha_mode, alpha_value)
    out_c = len({d for j in jobs for d in j.dst})
    # uniform windows: on CUDA they batch; compiled, they are one shape (one compile) instead of up to four
    layout = Layout.for_model(report.align, overlap, uniform=device.type == "cuda" or compiled_model is not None)
    auto = not (tile_size and tile_size > 0)
    budget, bpp = memory_budget(model, device, dtype, layout, probe=auto, pixels=h * w)
    if device.type == "cpu" and h * w * bpp > budget:  # tiled: keep the working set small beside the output
        io_bytes = b * h * w * c * 4 * (1 + s * s)
        # ... but never below one efficient tile: a model that needs much memory per pixel (EIMN: ~7 KB)
        # would otherwise run many small tiles whose context work costs more than the memory saved
        side = CPU_EFFICIENT_TILE
        if parameter_count(model) >= CPU_COSTLY_PARAMS:
            side = max(side, CPU_CONTEXT_RATIO * layout.context)
        efficient = bpp * (side + 2 * layout.context) ** 2
        budget = min(budget, max(CPU_TILED_FLOOR, CPU_TILED_SHARE * io_bytes, efficient))
    tile = auto_tile(budget, bpp, layout, h, w, b) if auto else tile_size
    batch = auto_batch(budget, bpp, layout, tile, h, w)

    # ComfyUI's layout: models are fed channels-last, so their outputs copy in row by row. One tile per
    # image writes every output pixel once: no zero fill then (crossfades accumulate into zeros otherwise).
    whole = tile >= max(h, w)
    out = (torch.empty if whole else torch.zeros)(b, h * s, w * s, out_c, dtype=torch.float32)
    out_bchw = out.permute(0, 3, 1, 2)
    src_bchw = image.permute(0, 3, 1, 2)
    runner = TileRunner(model, device, dtype, layout, tile, batch, report, check_cancel, tracker.add,
                        tracker.partial if tracker.callback is not None else None,
                        compiled_model)
    runner.dst_zeroed = not whole
    for job in jobs:
        dst = out_bchw[:, _run(job.dst)]
        if job.kind == "fill":
            dst.fill_(job.fill)
        elif job.kind == "resample":
            alpha = src_bchw[:, _run(job.src)]
            for i in range(b):
                up = F.interpolate(alpha[i : i + 1], size=(h * s, w * s), mode="bicubic", align_corners=False)
                dst[i].copy_(up[0].clamp_(0, 1))
        else:
            adopt = whole and len(jobs) == 1 and dst.shape[1] == out_c
            result = runner.run(src_bchw[:, _run(job.src)], dst, job.pre, job.post, adopt=adopt)
            if result is not None:  # the model's own output, channels-last: already ComfyUI's layout
                out = result.permute(0, 2, 3, 1)
    report.tile = runner.tile
    report.precision = NAMES.get(runner.dtype, report.precision)
    return out


def _run(idx: tuple[int, ...]) -> slice:
    """``(1, 2, 3)`` -> ``slice(1, 4)``: channel selections stay views (jobs always use runs)."""
    if any(b - a != 1 for a, b in zip(idx, idx[1:])):
        raise AssertionError(f"channel set {idx} is not a run")
    return slice(idx[0], idx[-1] + 1)
