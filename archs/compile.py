"""``torch.compile`` for FlexSR's models: compiled once per input shape, kept with the model, eager on failure.

``compiled(model)`` returns a :class:`CompiledModel`, a callable taking ``[B, C, H, W]`` like the model.
Its first call on an input shape (with that dtype, device, memory layout, autocast and grad mode)
compiles the model for exactly that shape (``dynamic=False``: static shapes give the fastest kernels);
later calls on the same shape run the compiled code. At most ``max_shapes`` shapes are compiled per
model, later new shapes run eagerly. The object is kept on the network (a plain attribute, not in the
state dict, dropped by ``copy.deepcopy`` and pickling), so calling ``compiled(model)`` again, e.g. on a
second run of a ComfyUI node, returns the same object and compiles nothing anew.

On disk, inductor's FX graph cache and AOT autograd cache keep the generated code: a fresh process
(a restarted ComfyUI) that compiles the same model for the same shape still traces it (seconds) but
skips code generation and the C++ compiler (most of the cost). :func:`use_cache_dir` points those
caches at a stable folder (``$FLEXSR_COMPILE_CACHE``, else ``~/.cache/flexsr/torch_compile``) unless
``TORCHINDUCTOR_CACHE_DIR`` is set already, in which case that folder is used.

Any failure to compile (no C++ compiler, an unsupported op, a recompile limit) logs one warning and the
model runs eagerly from then on: same results, no crash. Out-of-memory errors pass through (the caller
may retry smaller).

Whether compiling pays depends on the network and the machine (one host measured FlexNet 1.55x faster
compiled, another of the same kind 1.04-1.09x), so no list of families is kept here: the upscale node's
``compile="auto"`` times the network compiled against eager on the running machine and remembers the answer
(``nodes/choices.py``); ``bench/bench_compile.py`` measures every family.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Hashable, Optional

import torch
from torch import Tensor, nn

log = logging.getLogger("flexsr")

CACHE_ENV = "FLEXSR_COMPILE_CACHE"
#: Shapes compiled per model at most; a new shape beyond them runs eagerly.
MAX_SHAPES = 8

def default_cache_dir() -> Path:
    """``$FLEXSR_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/flexsr/torch_compile`` (``~/.cache/...``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flexsr" / "torch_compile"


def use_cache_dir(path: Optional[str | os.PathLike] = None) -> Path:
    """The folder inductor's on-disk caches use: ``TORCHINDUCTOR_CACHE_DIR`` when set (kept), else
    ``path`` (default :func:`default_cache_dir`), which is created and set for this process.

    Set it before the first compile of the process: torch sets the variable itself (to a folder under
    the system's temporary directory, often emptied on reboot) the first time it compiles anything.
    """
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current:
        return Path(current)
    folder = Path(path).expanduser() if path is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.resolve())
    log.info("FlexSR: torch.compile caches in %s", folder)
    return folder


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e))


class CompiledModel:
    """``module`` compiled per input shape; a callable ``[B, C, H, W] -> [B, C', H', W']``.

    Attributes: ``shapes`` (input keys compiled so far), ``compiles`` and ``compile_seconds`` (wall
    time of the calls that compiled), ``failed`` (why compiling was given up, or None), ``eager_calls``.
    """

    def __init__(self, module: nn.Module, *, max_shapes: int = MAX_SHAPES, mode: Optional[str] = None,
                 cache_dir: Optional[str | os.PathLike] = None):
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, not {max_shapes}")
        self.module = module
        self.max_shapes = max_shapes
        self.mode = mode
        self.cache_dir = cache_dir
        self.shapes: set[Hashable] = set()
        self.compiles = 0
        self.compile_seconds = 0.0
        self.eager_calls = 0
        self.failed: Optional[str] = None
        self._compiled = None

    @staticmethod
    def key(x: Tensor) -> Hashable:
        """What a compiled graph is specialised on: shape, dtype, device, layout, autocast and grad mode."""
        autocast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        layout = "cl" if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else \
            "c" if x.is_contiguous() else tuple(x.stride())
        return (tuple(x.shape), x.dtype, str(x.device), layout, autocast, torch.is_grad_enabled(),
                torch.is_inference_mode_enabled())

    def will_compile(self, x: Tensor) -> bool:
        """Whether a call on ``x`` would compile now (a new shape, within ``max_shapes``, no failure)."""
        return self.failed is None and self.key(x) not in self.shapes and len(self.shapes) < self.max_shapes

    def runs_compiled(self, x: Tensor) -> bool:
        """Whether a call on ``x`` runs compiled code (compiled already or compiling now)."""
        return self.failed is None and (self.key(x) in self.shapes or len(self.shapes) < self.max_shapes)

    def __call__(self, x: Tensor) -> Tensor:
        if self.failed is not None:
            return self._eager(x)
        key = self.key(x)
        if key in self.shapes:
            return self._get()(x)
        if len(self.shapes) >= self.max_shapes:
            return self._eager(x)
        start = time.perf_counter()
        try:
            with _compile_settings():
                y = self._get()(x)
        except Exception as e:
            if _is_oom(e):
                raise
            self.give_up(e)
            return self._eager(x)
        self.shapes.add(key)
        self.compiles += 1
        self.compile_seconds += time.perf_counter() - start
        log.info("FlexSR: compiled %s for %s in %.1f s", type(self.module).__name__, tuple(x.shape),
                 time.perf_counter() - start)
        return y

    def give_up(self, error: BaseException) -> None:
        """Stop compiling (after ``error``): every later call runs eagerly; one warning says why."""
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        self.failed = f"{type(error).__name__}: {first}"
        log.warning("FlexSR: torch.compile failed for %s (%s); running it without compiling.",
                    type(self.module).__name__, self.failed)

    def _eager(self, x: Tensor) -> Tensor:
        self.eager_calls += 1
        return self.module(x)

    def _get(self):
        if self._compiled is None:
            use_cache_dir(self.cache_dir)
            self._compiled = torch.compile(self.module, dynamic=False, mode=self.mode)
        return self._compiled

    def __repr__(self) -> str:
        state = f"failed: {self.failed}" if self.failed else f"{len(self.shapes)} shape(s)"
        return f"CompiledModel({type(self.module).__name__}, {state})"


@contextlib.contextmanager
def _compile_settings():
    """The on-disk caches on, and a recompile limit that raises (caught above) instead of quietly
    running eagerly; generous enough for several models of one class."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=True), functorch_config.patch(enable_autograd_cache=True), \
            dynamo_config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        yield


class _Slot:
    """Holds a module's :class:`CompiledModel` objects; copies and pickles of the module start empty."""

    __slots__ = ("items",)

    def __init__(self):
        self.items: dict[Hashable, CompiledModel] = {}

    def __deepcopy__(self, memo):
        return _Slot()

    def __reduce__(self):
        return (_Slot, ())


_ATTR = "_flexsr_compiled"


def compiled(model, *, max_shapes: int = MAX_SHAPES, mode: Optional[str] = None,
             cache_dir: Optional[str | os.PathLike] = None) -> CompiledModel:
    """The :class:`CompiledModel` of ``model`` (an ``nn.Module`` or a spandrel descriptor's network).

    The same object is returned for the same network and options, so shapes compiled by one caller are
    reused by the next. Nothing compiles until the first call.
    """
    module = getattr(model, "model", model)
    if not isinstance(module, nn.Module):
        raise TypeError(f"compiled() takes an nn.Module or a spandrel model descriptor, not {type(model).__name__}")
    slot = module.__dict__.get(_ATTR)
    if not isinstance(slot, _Slot):
        slot = _Slot()
        object.__setattr__(module, _ATTR, slot)
    options = (max_shapes, mode)
    item = slot.items.get(options)
    if item is None:
        item = slot.items[options] = CompiledModel(module, max_shapes=max_shapes, mode=mode, cache_dir=cache_dir)
    return item


__all__ = ["CompiledModel", "compiled", "default_cache_dir", "use_cache_dir"]
