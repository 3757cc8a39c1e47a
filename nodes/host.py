"""The one module that touches ComfyUI.

Everything ComfyUI-specific FlexSR uses goes through here: model folders (``folder_paths``), the
progress bar (``comfy.utils.ProgressBar``), devices, free memory, unloading other models and
cancellation (``comfy.model_management``). Each is imported lazily, at call time, and falls back to a
plain stand-in when ComfyUI is not importable (pytest, scripts, benchmarks):

- model folders: ``$FLEXSR_UPSCALE_MODELS`` (``os.pathsep``-separated) then the pack's ``models/``;
- progress: a counter that calls an optional callback;
- device: CUDA if available, else CPU; free memory from CUDA or ``/proc/meminfo``;
- cancellation: :func:`request_interrupt` sets a flag that the next check raises as :class:`Interrupted`.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger("flexsr")

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_MODELS = PACK_ROOT / "models"
FOLDER = "upscale_models"
MODEL_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")


_modules: dict[str, object] = {}


def _import(name: str):
    """``name`` imported once (None when it cannot be); :func:`forget_host` clears the memo."""
    if name not in _modules:
        try:
            _modules[name] = __import__(name, fromlist=["_"])
        except Exception:  # not inside ComfyUI (or a broken install): use the plain fallbacks
            _modules[name] = None
    return _modules[name]


def forget_host() -> None:
    """Look ComfyUI's modules up again on next use."""
    _modules.clear()


def folder_paths():
    """ComfyUI's ``folder_paths`` module, or None outside ComfyUI."""
    module = _import("folder_paths")
    return module if module is not None and hasattr(module, "get_filename_list") else None


def model_management():
    module = _import("comfy.model_management")
    return module if module is not None and hasattr(module, "get_torch_device") else None


def in_comfyui() -> bool:
    return folder_paths() is not None


# --------------------------------------------------------------------------------------------------
# Model folders


def register_pack_models() -> None:
    """Make the pack's ``models/`` folder one of ComfyUI's ``upscale_models`` folders (when it exists)."""
    fp = folder_paths()
    if fp is None or not PACK_MODELS.is_dir():
        return
    try:
        if str(PACK_MODELS) not in fp.get_folder_paths(FOLDER):
            fp.add_model_folder_path(FOLDER, str(PACK_MODELS))
    except Exception as e:  # an old or unusual folder_paths: the shipped model is then just not listed
        log.warning("FlexSR: could not register %s as an upscale_models folder: %s", PACK_MODELS, e)


def model_folders() -> list[Path]:
    """The ``upscale_models`` folders, the one new files are saved to first."""
    fp = folder_paths()
    if fp is not None:
        return [Path(p) for p in fp.get_folder_paths(FOLDER)]
    env = os.environ.get("FLEXSR_UPSCALE_MODELS", "")
    folders = [Path(p) for p in env.split(os.pathsep) if p]
    return folders + [PACK_MODELS]


#: The pack's own models, listed first in this order (the drawn-art upscalers before the small demo model).
SHIPPED_FIRST = ("FlexSR_anime_x2.safetensors", "FlexSR_anime_x4.safetensors", "FlexSR_anime_real_x2.safetensors",
                 "FlexSR_anime_real_x4.safetensors", "FlexSR_default_x2.safetensors")


def model_names() -> list[str]:
    """Every model file in the ``upscale_models`` folders (subfolders too), as relative names; the pack's
    shipped models (:data:`SHIPPED_FIRST`) first, the rest sorted."""
    fp = folder_paths()
    if fp is not None:
        names = list(fp.get_filename_list(FOLDER))
    else:
        found: set[str] = set()
        for folder in model_folders():
            if folder.is_dir():
                for path in folder.rglob("*"):
                    if path.is_file() and path.suffix.lower() in MODEL_EXTENSIONS:
                        found.add(path.relative_to(folder).as_posix())
        names = sorted(found)
    first = [n for n in SHIPPED_FIRST if n in names]
    return first + [n for n in names if n not in first]


def model_path(name: str) -> Path:
    """The full path of a name from :func:`model_names`; raises FileNotFoundError if there is none."""
    fp = folder_paths()
    if fp is not None:
        return Path(fp.get_full_path_or_raise(FOLDER, name))
    for folder in model_folders():
        path = (folder / name).resolve()
        if path.is_file() and folder.resolve() in path.parents:
            return path
    raise FileNotFoundError(f"Model '{name}' is not in any upscale_models folder ({', '.join(map(str, model_folders()))}).")


def compile_cache_dir() -> Optional[Path]:
    """Where torch.compile's on-disk caches go inside ComfyUI: ``<ComfyUI user directory>/flexsr/torch_compile``
    (kept across restarts, unlike ComfyUI's temp folder). None outside ComfyUI (the library's default then)."""
    fp = folder_paths()
    getter = getattr(fp, "get_user_directory", None) if fp is not None else None
    if getter is None:
        return None
    try:
        return Path(getter()) / "flexsr" / "torch_compile"
    except Exception as e:  # an unusual folder_paths: the library's default folder is used
        log.debug("FlexSR: no ComfyUI user directory (%s)", e)
        return None


# --------------------------------------------------------------------------------------------------
# Devices and memory


def torch_device() -> torch.device:
    mm = model_management()
    if mm is not None:
        return torch.device(mm.get_torch_device())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_ram() -> int:
    """Bytes of RAM available to new allocations (``MemAvailable``), without psutil."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device`` (CUDA: driver-free plus what torch has cached)."""
    mm = model_management()
    if mm is not None:
        try:
            return int(mm.get_free_memory(device))
        except Exception:  # fall through to our own reading
            pass
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        stats = torch.cuda.memory_stats(device)
        cached = stats.get("reserved_bytes.all.current", 0) - stats.get("active_bytes.all.current", 0)
        return int(free + cached)
    return available_ram()


def make_room(required: int, device: torch.device) -> None:
    """Ask ComfyUI to unload other models until ``required`` bytes are free (no-op outside ComfyUI)."""
    mm = model_management()
    if mm is not None and device.type != "cpu":
        try:
            mm.free_memory(required, device)
        except Exception as e:
            log.debug("FlexSR: free_memory failed: %s", e)


def empty_cache() -> None:
    mm = model_management()
    if mm is not None:
        try:
            mm.soft_empty_cache()
            return
        except Exception:
            pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [torch.OutOfMemoryError] if hasattr(torch, "OutOfMemoryError") else []
    types.append(torch.cuda.OutOfMemoryError)
    mm = model_management()
    extra = getattr(mm, "OOM_EXCEPTION", None) if mm is not None else None
    if isinstance(extra, type) and extra is not Exception and issubclass(extra, BaseException):
        types.append(extra)
    return tuple(dict.fromkeys(types))


# --------------------------------------------------------------------------------------------------
# Cancellation


class Interrupted(Exception):
    """Raised outside ComfyUI when :func:`request_interrupt` was called (ComfyUI raises its own type)."""


_interrupt = threading.Event()


def request_interrupt(value: bool = True) -> None:
    """Outside ComfyUI: make the next :func:`check_interrupted` raise (ComfyUI's own button inside it)."""
    mm = model_management()
    if mm is not None:
        mm.interrupt_current_processing(value)
    elif value:
        _interrupt.set()
    else:
        _interrupt.clear()


def check_interrupted() -> None:
    """Raise if the user cancelled (ComfyUI's ``InterruptProcessingException`` inside ComfyUI)."""
    mm = model_management()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
        return
    if _interrupt.is_set():
        _interrupt.clear()
        raise Interrupted("Upscale cancelled.")


# --------------------------------------------------------------------------------------------------
# Progress


class PlainProgressBar:
    """The stand-in for ``comfy.utils.ProgressBar``: same methods, optional callback(current, total)."""

    def __init__(self, total: int, callback: Optional[Callable[[int, int], None]] = None):
        self.total = total
        self.current = 0
        self.callback = callback

    def update_absolute(self, value: int, total: Optional[int] = None, preview=None) -> None:
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        if self.callback is not None:
            self.callback(self.current, self.total)

    def update(self, value: int) -> None:
        self.update_absolute(self.current + value)


#: Outside ComfyUI, progress bars report here when set (tests use it).
progress_callback: Optional[Callable[[int, int], None]] = None


def progress_bar(total: int):
    utils = _import("comfy.utils")
    if utils is not None and hasattr(utils, "ProgressBar") and in_comfyui():
        return utils.ProgressBar(total)
    return PlainProgressBar(total, progress_callback)


# --------------------------------------------------------------------------------------------------
# The pack's HTTP route and error names (ComfyUI's server and error reports)

#: The route the web extension asks for a model's description: ``GET /flexsr/model_info?name=<model_name>``.
MODEL_INFO_ROUTE = "/flexsr/model_info"
REPORT_ROUTE = "/flexsr/last_report"
#: The last report each node (by its id in the prompt) sent, for pages that hold none (a new tab or browser
#: opening a workflow whose results come from ComfyUI's cache). Kept for the server's life, at most 256.
LAST_REPORTS: dict[str, str] = {}


def keep_report(node_id, text: str) -> None:
    """Remember ``text`` as the last report of node ``node_id`` (ComfyUI's UNIQUE_ID; None: not kept)."""
    if node_id is None:
        return
    LAST_REPORTS.pop(str(node_id), None)
    LAST_REPORTS[str(node_id)] = text
    while len(LAST_REPORTS) > 256:
        LAST_REPORTS.pop(next(iter(LAST_REPORTS)))


def last_report_reply(node_id: Optional[str]) -> tuple[int, dict]:
    """(HTTP status, JSON body) for ``GET /flexsr/last_report?node=<id>``: 200 ``{"node", "report"}``, 404 when
    the server has none for that node, 400 without one."""
    if not node_id:
        return 400, {"error": "Give the node's id: /flexsr/last_report?node=<id>."}
    text = LAST_REPORTS.get(str(node_id))
    if text is None:
        return 404, {"node": node_id, "error": "no report of that node since the server started"}
    return 200, {"node": node_id, "report": text}


def prompt_server():
    """ComfyUI's running ``PromptServer`` (None outside ComfyUI or before the server exists)."""
    module = _import("server")
    server_class = getattr(module, "PromptServer", None) if module is not None else None
    return getattr(server_class, "instance", None)


def model_info_reply(name: Optional[str], describe_file: Callable[[Path], str]) -> tuple[int, dict]:
    """(HTTP status, JSON body) for ``GET /flexsr/model_info?name=...``: the description of a listed model.

    200 ``{"name", "info"}``; 400 without a name; 404 for a name that is not in the ``upscale_models``
    folders; 422 ``{"name", "error", "type"}`` when the file is there but does not load.
    """
    if not name:
        return 400, {"error": "Give the model's name: /flexsr/model_info?name=<model_name>."}
    if name not in model_names():
        return 404, {"name": name, "error": f"'{name}' is not in any upscale_models folder.", "type": "FileNotFoundError"}
    try:
        return 200, {"name": name, "info": describe_file(model_path(name))}
    except Exception as e:  # the file is listed but does not load: say why, as the loader node would
        return 422, {"name": name, "error": str(e), "type": type(e).__name__}


def register_routes(describe_file: Callable[[Path], str]) -> bool:
    """Add ``GET /flexsr/model_info`` and ``GET /flexsr/last_report`` to ComfyUI's server (True when added;
    nothing outside ComfyUI).

    The description is computed in a worker thread (loading a checkpoint must not block the server).
    """
    server = prompt_server()
    routes = getattr(server, "routes", None)
    if routes is None:
        return False
    try:
        import asyncio

        from aiohttp import web
    except ImportError:
        return False

    async def model_info(request):
        name = request.rel_url.query.get("name")
        status, body = await asyncio.get_running_loop().run_in_executor(None, model_info_reply, name, describe_file)
        return web.json_response(body, status=status)

    async def last_report(request):
        status, body = last_report_reply(request.rel_url.query.get("node"))
        return web.json_response(body, status=status)

    try:
        routes.get(MODEL_INFO_ROUTE)(model_info)
        routes.get(REPORT_ROUTE)(last_report)
    except Exception as e:  # a server without the usual route table: the panel then shows run results only
        log.warning("FlexSR: could not add %s: %s", MODEL_INFO_ROUTE, e)
        return False
    return True


def short_error_names(base: type) -> None:
    """Show ``base`` and its subclasses by class name alone in ComfyUI's error reports.

    ComfyUI names an exception's type ``<module>.<class>``, and a custom node pack's module is named
    after its folder's full path; with ``__module__ = "builtins"`` the report says just the class name
    (``ModelExistsError``). Only called inside ComfyUI.
    """
    seen: set[type] = set()
    todo = [base]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        cls.__module__ = "builtins"
        todo.extend(cls.__subclasses__())
