"""The end of a run: the exported .safetensors (with its provenance: command, data hashes, machine, wall time,
versions), the side-by-side PNG of validation images and ``summary.json``."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

import archs

from .checkpoint import atomic_write, atomic_write_text, read_jsonl
from .metrics import bicubic_upscale
from .models import export_name, export_safetensors, lineage, parameter_count
from .runlog import METRICS_NAME

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("flexsr")


@torch.no_grad()
def side_by_side(model: nn.Module, pairs: list, scale: int, device, path: Path, count: int = 3) -> Path | None:
    """PNG rows of LR (nearest) | bicubic | model | HR for the first ``count`` validation images."""
    from PIL import Image, ImageDraw

    rows = []
    model.eval()
    for name, lr, hr in pairs[:count]:
        lr1 = lr.unsqueeze(0)
        sr = model(lr1.to(device)).float().clamp(0, 1).cpu()[..., : hr.shape[-2], : hr.shape[-1]]
        near = F.interpolate(lr1, scale_factor=scale, mode="nearest")
        bic = bicubic_upscale(lr1, scale)
        tiles = [near[0], bic[0], sr[0], hr]
        rows.append(torch.cat([torch.cat([t, torch.ones(3, t.shape[1], 4)], 2) for t in tiles], 2))
    if not rows:
        return None
    w = max(r.shape[2] for r in rows)
    rows = [F.pad(r, (0, w - r.shape[2], 0, 4), value=1.0) for r in rows]
    grid = torch.cat(rows, 1)
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    header = Image.new("RGB", (arr.shape[1], 14), (255, 255, 255))
    tile_w = pairs[0][2].shape[-1] + 4
    for i, label in enumerate(("LR (nearest)", "bicubic", "model", "HR")):
        ImageDraw.Draw(header).text((i * tile_w + 2, 1), label, fill=(0, 0, 0))
    img = Image.new("RGB", (arr.shape[1], arr.shape[0] + 14), (255, 255, 255))
    img.paste(header, (0, 0))
    img.paste(Image.fromarray(arr), (0, 14))
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def data_manifests(folders) -> dict[str, str]:
    """SHA-256 of the manifest (``manifest.jsonl``, as ``python -m training.art build`` writes) that describes
    each --data folder: in the folder or the one above it."""
    import hashlib

    found = {}
    for folder in folders or []:
        for cand in (Path(folder) / "manifest.jsonl", Path(folder).parent / "manifest.jsonl"):
            if cand.is_file():
                found[str(folder)] = hashlib.sha256(cand.read_bytes()).hexdigest()
                break
    return found


def data_pixel_hashes(folders) -> dict[str, str]:
    """The art builder's ``pixels_sha256`` (``summary.json`` beside the manifest) of each --data folder: the
    data's content hash, the same whatever PNG encoder wrote the files."""
    found = {}
    for folder in folders or []:
        for cand in (Path(folder) / "summary.json", Path(folder).parent / "summary.json"):
            if cand.is_file():
                try:
                    value = json.loads(cand.read_text()).get("pixels_sha256")
                except (ValueError, OSError, AttributeError):
                    value = None
                if isinstance(value, str):
                    found[str(folder)] = value
                break
    return found


def provenance(args, device, seconds: float) -> dict[str, str]:
    """What a shipped model records beside its command: data manifest hash, machine, wall time, versions."""
    import platform

    manifests = data_manifests(args.data)
    pixels = data_pixel_hashes(args.data)
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {
        "data_manifest_sha256": ";".join(f"{k}={v}" for k, v in manifests.items()) if manifests else
                                ("generated (training/synthetic.py)" if not args.data else "none found"),
        **({"data_pixels_sha256": ";".join(f"{k}={v}" for k, v in pixels.items())} if pixels else {}),
        "machine": machine,
        "wall_time_s": f"{seconds:.0f}",
        "torch": torch.__version__,
        # the file it started from: name, SHA-256 and, for a model made here, how that one was made
        **(lineage(args.pretrained, "pretrained") if getattr(args, "pretrained", None) else {}),
        # the frozen model whose clean-input outputs it was held to (--distill)
        **(lineage(args.distill, "distill") if getattr(args, "distill", None) else {}),
    }


def finish(run: Run, out: Path, start: int, stopped_early: bool, last_val: dict, seconds: float,
           best: dict | None = None, start_val: dict | None = None) -> dict:
    """Export the best validated (EMA) weights (``--export best``, the default; the last ones with ``--export
    last`` or without validation) as .safetensors, write the side-by-side PNG and summary.json (atomically), and
    say plainly how the run ended against its start."""
    args = run.args
    final = (run.ema.model if run.ema else run.model)
    final = copy.deepcopy(final).cpu().eval()
    records = read_jsonl(out / METRICS_NAME)
    steps_done = max((r["step"] for r in records), default=start)
    which = getattr(args, "export", "best")
    exported_step, exported_val = steps_done, last_val
    if which == "best" and best is not None and best.get("weights") is not None and last_val \
            and best["psnr"] > last_val["psnr"]:
        final.load_state_dict(best["weights"])
        exported_step, exported_val = int(best["step"]), best["val"]
    for m in archs.fusable_modules(final):
        m.refresh_fused()  # keep stored fused kernels in step with the trained branches
    meta = {
        "flexsr_architecture": run.loaded.architecture,
        "scale": run.loaded.scale,
        "steps": steps_done,
        "exported_step": exported_step,
        "seed": args.seed,
        "command": " ".join(getattr(args, "command", []) or []),
        **provenance(args, run.dist.device, run.wall_before + seconds),
    }
    if exported_val:
        meta["val_psnr"] = f"{exported_val['psnr']:.4f}"
    if start_val:
        meta["val_psnr_start"] = f"{start_val['psnr']:.4f}"
    name = export_name(final, args.name)
    model_path = export_safetensors(final, out / f"{name}.safetensors", meta)
    png = None
    if run.val_pairs:
        png = side_by_side(final, run.val_pairs, run.loaded.scale, "cpu", out / f"{name}_samples.png")
    summary = {
        "model": str(model_path),
        "samples_png": str(png) if png else None,
        "architecture": run.loaded.architecture,
        "scale": run.loaded.scale,
        "parameters": parameter_count(final),
        "steps": steps_done,
        "exported": {"which": "best" if exported_step != steps_done else "last", "export_flag": which,
                     "step": exported_step, **({"val_psnr": exported_val["psnr"]} if exported_val else {})},
        "stopped_early": stopped_early,
        "schedule_by_time": run.scheduler.extra > 0,  # --time-budget changed the schedule (not step-exact)
        "seconds": seconds,
        "world_size": run.dist.world_size,
    }
    if exported_val:
        summary.update({f"val_{k}": v for k, v in exported_val.items()})
        summary["val_gain_db"] = exported_val["psnr"] - exported_val["bicubic_psnr"]
    if last_val:
        summary["last_val"] = {"step": steps_done, **last_val}
    if best is not None:
        summary["best_val"] = {"step": int(best["step"]), **best["val"]}
    if start_val:
        summary["start_val"] = {"step": 0, **start_val}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("Exported %s (%s)", model_path, "the weights of step %d, the best validated" % exported_step
             if exported_step != steps_done else "the last weights")
    if exported_val:
        log.info("Held-out Y-PSNR %.3f dB vs bicubic %.3f dB: %+.3f dB (SSIM %.4f vs %.4f) over %d images.",
                 exported_val["psnr"], exported_val["bicubic_psnr"], summary["val_gain_db"], exported_val["ssim"],
                 exported_val["bicubic_ssim"], exported_val["n"])
    if start_val and last_val:
        d_last = last_val["psnr"] - start_val["psnr"]
        d_exp = exported_val["psnr"] - start_val["psnr"] if exported_val else d_last
        log.info("Against the starting model (step 0, %.3f dB): the last step %+.3f dB, the exported weights %+.3f dB.",
                 start_val["psnr"], d_last, d_exp)
        if d_last < 0:
            log.warning("This fine-tune ended BELOW its start: the last weights score %.3f dB, %.3f dB less than the "
                        "model it started from.%s", last_val["psnr"], -d_last,
                        " The exported file holds the starting weights (no validated step beat them)."
                        if exported_step == 0 else (f" The exported file holds step {exported_step}, the best validated."
                                                    if exported_step != steps_done else ""))
    if png:
        log.info("Side-by-side (LR | bicubic | model | HR): %s", png)
    return summary
