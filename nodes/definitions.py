"""FlexSR's ComfyUI nodes: each declares its inputs and outputs and calls one function."""

from __future__ import annotations

import logging

from . import host, model_io
from .channels import ALPHA_MODES
from .quality import jpeg_note
from .engine import COMPILE_MODES, CPU_WORKSET, PRECISIONS, check_image, upscale_image

log = logging.getLogger("flexsr")

CATEGORY = "FlexSR"
PROGRESS_STEPS = 1000


class LoadUpscaleModel:
    DESCRIPTION = (
        "Loads an upscale model from ComfyUI's upscale_models folders (subfolders too): FlexSR's families "
        "and every architecture spandrel knows, detected from the weights. Pickles that would run code "
        "are refused. Returns the model (usable by ComfyUI's own upscale nodes too) and a description."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("UPSCALE_MODEL", "STRING")
    RETURN_NAMES = ("upscale_model", "info")
    OUTPUT_TOOLTIPS = (
        "The loaded model (a spandrel ImageModelDescriptor).",
        "Architecture, scale, parameters, channels and size needs, one per line.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (host.model_names(), {
                    "tooltip": "A checkpoint (.safetensors, .pth, .pt, .ckpt, .bin) in models/upscale_models."
                }),
            }
        }

    def load(self, model_name):
        model = model_io.load(host.model_path(model_name))
        info = model_io.describe(model)
        log.info("FlexSR: loaded %s\n%s", model_name, info)
        return {"ui": {"flexsr_info": [info]}, "result": (model, info)}


class UpscaleImage:
    DESCRIPTION = (
        "Upscales images with an upscale model, tile by tile: tiles follow the model's window grid and see "
        "context around them, so the result matches upscaling the whole image at once. Tile size follows "
        "free memory; running out of memory halves the tile and carries on. Grey, RGB and RGBA images, "
        "any batch and size."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The upscaled images, with the input's channels (RGBA when a mask is given).",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "upscale_model": ("UPSCALE_MODEL", {"tooltip": "The model, from a Load Upscale Model node."}),
                "image": ("IMAGE", {"tooltip": "The images to upscale (grey, RGB or RGBA)."}),
                "tile_size": ("INT", {
                    "default": 0, "min": 0, "max": 8192, "step": 8,
                    "tooltip": "Tile size in input pixels; 0 = automatic: the whole image in one model call when it "
                               "fits the memory budget (free GPU memory; on a CPU 40% of the available RAM, at most "
                               f"{CPU_WORKSET >> 30} GiB), measured from the model's cost; otherwise even tiles.",
                }),
                "overlap": ("INT", {
                    "default": 32, "min": 0, "max": 512, "step": 8,
                    "tooltip": "Context pixels each tile sees beyond its edges where tiles meet (rounded up to the "
                               "model's window grid); the middle half of it is crossfaded. 0 = hard seams.",
                }),
                "precision": (list(PRECISIONS), {
                    "default": "auto",
                    "tooltip": "auto = fp16 (or bf16) on GPU when the model supports it; on CPU fp32, except bf16 for "
                               "the families measured faster in it where the CPU has native bf16. A precision "
                               "the model does not support is replaced by the nearest one it does.",
                }),
                "target_scale": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 16.0, "step": 0.05,
                    "tooltip": "Output scale; 0 = the model's. Below it: the model, then an antialiased downscale. "
                               "Above it: the model again (up to 4 passes), then a resize to the exact size.",
                }),
                "alpha": (list(ALPHA_MODES), {
                    "default": "model",
                    "tooltip": "RGBA images: upscale alpha with the model, with bicubic resampling, or discard it.",
                }),
            },
            "optional": {
                "mask": ("MASK", {
                    "tooltip": "Supplies alpha (the output is RGBA); resized to the image if needed.",
                }),
                "invert_mask": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "On: alpha = 1 − mask (ComfyUI masks mark transparency, as Load Image's MASK and "
                               "Join Image with Alpha do). Off: alpha = mask.",
                }),
                "compile": (list(COMPILE_MODES), {
                    "default": "off",
                    "tooltip": "torch.compile the model: the first run on each tile shape compiles (tens of seconds "
                               "to minutes on a CPU; far less after a restart, from the on-disk cache), later tiles "
                               "and runs are faster. auto = only for the families measured faster compiled here; "
                               "on = always; off = never. A failed compile falls back to the plain model.",
                }),
                "ensemble": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Upscale the 8 flips and quarter turns of the image and average them (each turned back "
                               "exactly): a little cleaner, 8× the time.",
                }),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def upscale(self, upscale_model, image, tile_size=0, overlap=32, precision="auto", target_scale=0.0,
                alpha="model", mask=None, invert_mask=True, compile="off", ensemble=False, unique_id=None):
        bar = host.progress_bar(PROGRESS_STEPS)

        def progress(done: int, total: int) -> None:
            bar.update_absolute(int(PROGRESS_STEPS * done / max(total, 1)), PROGRESS_STEPS)

        out, report = upscale_image(
            upscale_model, image, tile_size=tile_size, overlap=overlap, precision=precision,
            target_scale=target_scale, alpha_mode=alpha, mask=mask, invert_mask=invert_mask,
            progress=progress, check_cancel=host.check_interrupted,
            compile=compile, compile_cache=host.compile_cache_dir() if compile != "off" else None, ensemble=ensemble,
        )
        bar.update_absolute(PROGRESS_STEPS, PROGRESS_STEPS)
        note = jpeg_note(check_image(image), upscale_model.scale, getattr(upscale_model, "flexsr_source", ""))
        text = report.text() + "\n" + note
        host.keep_report(unique_id, text)  # for a page that shows this result from the cache with nothing kept
        log.info("FlexSR: %s", text.replace("\n", "; "))
        return {"ui": {"flexsr_plan": [text]}, "result": (out,)}


class FuseOmniShift:
    DESCRIPTION = (
        "Fuses every OmniShift module (identity + 1×1 + 3×3 + 5×5 depthwise branches) into one 5×5 "
        "convolution: same output, faster. Returns a fused copy (the input model is left as it is) and how "
        "many modules were fused; a model with nothing to fuse passes through unchanged."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("UPSCALE_MODEL", "INT")
    RETURN_NAMES = ("upscale_model", "fused")
    OUTPUT_TOOLTIPS = ("The fused copy (or the input model when nothing was fusable).", "Modules fused.")
    FUNCTION = "fuse"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"upscale_model": ("UPSCALE_MODEL", {"tooltip": "The model to fuse."})}}

    def fuse(self, upscale_model):
        model, count = model_io.fused_copy(upscale_model)
        text = f"fused {count} OmniShift module{'s' if count != 1 else ''}" if count else "nothing to fuse"
        return {"ui": {"flexsr_info": [text]}, "result": (model, count)}


class InterpolateUpscaleModels:
    DESCRIPTION = (
        "Blends the weights of two upscale models of one architecture and scale (network interpolation): "
        "(1 - alpha) × A + alpha × B. With a fine-tune and the model it started from, alpha trades what "
        "the fine-tune gained (e.g. on drawn art) against what the original did better (e.g. photos). "
        "Returns a new model; the inputs are left as they are. Save it with Save Upscale Model."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("UPSCALE_MODEL",)
    RETURN_NAMES = ("upscale_model",)
    OUTPUT_TOOLTIPS = ("The blended model.",)
    FUNCTION = "interpolate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_a": ("UPSCALE_MODEL", {"tooltip": "The model alpha = 0 gives."}),
                "model_b": ("UPSCALE_MODEL", {"tooltip": "The model alpha = 1 gives (same architecture and scale)."}),
                "alpha": ("FLOAT", {
                    "default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                    "tooltip": "Weight of model B: 0 = model A, 1 = model B.",
                }),
            }
        }

    def interpolate(self, model_a, model_b, alpha):
        model = model_io.interpolated(model_a, model_b, alpha)
        text = f"{1 - alpha:.2f} × A + {alpha:.2f} × B ({model_io.arch_label(model)})"
        return {"ui": {"flexsr_info": [text]}, "result": (model,)}


class SaveUpscaleModel:
    DESCRIPTION = (
        "Saves an upscale model as a .safetensors file in the upscale_models folder, written atomically "
        "(a temporary file, then renamed) and never replacing a file unless overwrite is on. Both FlexSR's "
        "and ComfyUI's loaders read it back."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("The file written.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "upscale_model": ("UPSCALE_MODEL", {"tooltip": "The model to save."}),
                "filename": ("STRING", {
                    "default": "flexsr_model",
                    "tooltip": "A plain file name (no folders, no '..'); .safetensors is added when missing.",
                }),
                "overwrite": ("BOOLEAN", {
                    "default": False, "tooltip": "Replace an existing file of that name.",
                }),
            }
        }

    def save(self, upscale_model, filename, overwrite=False):
        path = model_io.save(upscale_model, filename, overwrite=overwrite)
        return {"ui": {"flexsr_info": [f"saved {path.name}"]}, "result": (str(path),)}


NODE_CLASS_MAPPINGS = {
    "FlexSRLoadUpscaleModel": LoadUpscaleModel,
    "FlexSRUpscaleImage": UpscaleImage,
    "FlexSRFuseOmniShift": FuseOmniShift,
    "FlexSRInterpolateUpscaleModels": InterpolateUpscaleModels,
    "FlexSRSaveUpscaleModel": SaveUpscaleModel,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FlexSRLoadUpscaleModel": "Load Upscale Model (FlexSR)",
    "FlexSRUpscaleImage": "Upscale Image (FlexSR)",
    "FlexSRFuseOmniShift": "Fuse OmniShift (FlexSR)",
    "FlexSRInterpolateUpscaleModels": "Interpolate Upscale Models (FlexSR)",
    "FlexSRSaveUpscaleModel": "Save Upscale Model (FlexSR)",
}
