"""Import the pack the way ComfyUI does: ``custom_nodes/<folder>/__init__.py`` as a package.

ComfyUI (``nodes.load_custom_node``) names the module after the folder's path (dots replaced by
``_x_``), registers it in ``sys.modules`` and executes ``__init__.py``; its own top-level ``nodes``
module is already imported by then. Models handed to the pack's nodes must come from that package's
own ``archs`` (``pack.archs``), which is a different module object from a top-level ``import archs``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def comfy_module_name(folder: Path) -> str:
    return str(folder).replace(".", "_x_")


def load_pack(folder: Path = ROOT, name: str | None = None, foreign_nodes: bool = True) -> types.ModuleType:
    """Execute ``folder/__init__.py`` as package ``name`` (ComfyUI's naming by default).

    With ``foreign_nodes``, a stand-in for ComfyUI's own top-level ``nodes`` module sits in
    ``sys.modules`` during the import (and is removed afterwards if it was not there before).
    """
    name = name or comfy_module_name(folder)
    if name in sys.modules:
        return sys.modules[name]
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
