"""FlexSR's ComfyUI nodes and the tiled upscale engine behind them.

Modules: ``definitions`` (the node classes), ``engine`` (tiled upscaling: memory, precision, OOM
fallback, passes), ``tiles`` (tile planning), ``blend`` (in-place crossfade writing), ``channels``
(grey/RGB/RGBA adaptation), ``model_io`` (load, describe, fuse, save) and ``host`` (the only module that
touches ComfyUI, with plain fallbacks outside it). Inside the pack use relative imports only: ComfyUI
has its own top-level ``nodes`` module.
"""

from .definitions import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
