"""Import the pack the way ComfyUI does: ``custom_nodes/<folder>/__init__.py`` as a package.

ComfyUI (``nodes.load_custom_node``) names the module after the folder's path (dots replaced by
``_x_``), registers it in ``sys.modules`` and executes ``__init__.py``; its own top-level ``nodes``
module is already imported by then. Models handed to the pack's nodes must come from that package's
own ``archs`` (``pack.archs``), which is a different module object from a top-level ``import archs``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import spandrel

ROOT = Path(__file__).resolve().parents[1]


def comfy_module_name(folder: Path) -> str:
    return str(folder).replace(".", "_x_")


@contextlib.contextmanager
def spandrel_registry_restored():
    """Undo, on exit, whatever was added to spandrel's global ``MAIN_REGISTRY`` meanwhile.

    Loading the pack calls ``archs.install()``, which adds the *pack's* copies of FlexSR's
    architectures; other tests check that registry against the top-level ``archs`` classes.
    """
    reg = spandrel.MAIN_REGISTRY
    saved = (reg._architectures, reg._ordered, reg._by_id)  # add() replaces these, never mutates them
    try:
        yield reg
    finally:
        reg._architectures, reg._ordered, reg._by_id = saved


def load_pack(folder: Path = ROOT, name: str | None = None, foreign_nodes: bool = True,
              leave_installed: bool = False) -> types.ModuleType:
    """Execute ``folder/__init__.py`` as package ``name`` (ComfyUI's naming by default).

    With ``foreign_nodes``, a stand-in for ComfyUI's own top-level ``nodes`` module sits in
    ``sys.modules`` during the import (and is removed afterwards if it was not there before).
    Unless ``leave_installed``, spandrel's global registry is restored after the import.
    """
    name = name or comfy_module_name(folder)
    if name in sys.modules:
        return sys.modules[name]
    with contextlib.ExitStack() as stack:
        if not leave_installed:
            stack.enter_context(spandrel_registry_restored())
        return _load(folder, name, foreign_nodes)


def _load(folder: Path, name: str, foreign_nodes: bool) -> types.ModuleType:
    had_nodes = "nodes" in sys.modules
    previous = sys.modules.get("nodes")
    if foreign_nodes:
        sys.modules["nodes"] = foreign_nodes_module()
    try:
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    finally:
        if foreign_nodes:
            if had_nodes:
                sys.modules["nodes"] = previous
            else:
                sys.modules.pop("nodes", None)
    return module


class ComfyStandIns:
    """Minimal ``folder_paths``, ``comfy.utils`` and ``comfy.model_management`` modules, as ComfyUI has them."""

    def __init__(self, models_dir: Path):
        self.models_dir = models_dir
        self.progress: list[tuple[int, int]] = []
        self.interrupted = False
        self.freed: list[int] = []
        fp = types.ModuleType("folder_paths")
        folders = {"upscale_models": [str(models_dir)]}
        fp.folder_names_and_paths = folders
        fp.get_folder_paths = lambda name: list(folders[name])
        fp.add_model_folder_path = lambda name, path, is_default=False: folders[name].append(path)
        fp.get_filename_list = lambda name: sorted(
            p.relative_to(models_dir).as_posix() for p in models_dir.rglob("*") if p.is_file()
        )
        fp.get_full_path_or_raise = lambda name, file: str(models_dir / file)
        comfy = types.ModuleType("comfy")
        comfy.__path__ = []
        utils = types.ModuleType("comfy.utils")
        outer = self

        class ProgressBar:
            def __init__(self, total):
                self.total, self.current = total, 0

            def update_absolute(self, value, total=None, preview=None):
                self.total = total or self.total
                self.current = value
                outer.progress.append((value, self.total))

        utils.ProgressBar = ProgressBar
        mm = types.ModuleType("comfy.model_management")

        class InterruptProcessingException(Exception):
            pass

        def throw_exception_if_processing_interrupted():
            if outer.interrupted:
                outer.interrupted = False
                raise InterruptProcessingException()

        mm.InterruptProcessingException = InterruptProcessingException
        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
        mm.interrupt_current_processing = lambda value=True: setattr(outer, "interrupted", value)
        mm.get_torch_device = lambda: __import__("torch").device("cpu")
        mm.get_free_memory = lambda dev=None: 8 << 30
        mm.free_memory = lambda required, device, keep_loaded=[]: outer.freed.append(required)
        mm.soft_empty_cache = lambda force=False: None
        mm.OOM_EXCEPTION = __import__("torch").OutOfMemoryError
        comfy.utils, comfy.model_management = utils, mm
        self.modules = {"folder_paths": fp, "comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm}

    @contextlib.contextmanager
    def installed(self):
        saved = {name: sys.modules.get(name) for name in self.modules}
        sys.modules.update(self.modules)
        try:
            yield self
        finally:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module


def foreign_nodes_module() -> types.ModuleType:
    """A module that looks like ComfyUI's ``nodes.py`` from the outside."""
    mod = types.ModuleType("nodes")
    mod.NODE_CLASS_MAPPINGS = {"ComfyUIOwnNode": object}
    mod.IS_COMFYUI_NODES = True
    return mod


try:
    import pytest
except ImportError:  # packutil also serves scripts
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def pack() -> types.ModuleType:
        """The pack imported as ComfyUI would, once per session, under an arbitrary folder-like name."""
        return load_pack(ROOT, name="custom_nodes_x_FlexSR-under-test")
