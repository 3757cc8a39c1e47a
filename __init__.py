"""FlexSR as a ComfyUI custom node pack (ComfyUI imports this file as a package).

Loading the pack adds FlexSR's architectures to spandrel's registry (so ComfyUI's own "Load Upscale
Model" reads them too) and lists the pack's ``models/`` folder among the ``upscale_models`` folders.
"""

from . import archs
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.host import register_pack_models

archs.install()
register_pack_models()

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
