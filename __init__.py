"""FlexSR as a ComfyUI custom node pack (ComfyUI imports this file as a package).

When ComfyUI loads the pack, FlexSR's architectures are added to spandrel's registry (so ComfyUI's own
"Load Upscale Model" reads them too) and the pack's ``models/`` folder joins the ``upscale_models``
folders. Imported anywhere else (pytest, scripts) it changes nothing global; call ``archs.install()``
yourself there.
"""

from . import archs
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes import host, model_io

if host.in_comfyui():
    archs.install()
    host.register_pack_models()
    host.register_routes(model_io.describe_file)  # GET /flexsr/model_info?name=... for the loader's panel
    host.short_error_names(archs.FlexSRError)  # error reports name the class, not the folder's path

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
