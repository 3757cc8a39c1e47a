"""What a run is made of, and how it is built: the ``Run`` (model, EMA, optimizers, schedule, AMP scaler, data
sampler, losses, validation pairs, discriminator), the model and data it starts from, the frozen body, the DDP
wrappers and the loader of its batches.

``build_run`` seeds Python, NumPy and torch, then builds the pieces in a fixed order, so that the random draws (the
model's initialisation, then the discriminator's) are the same for the same command.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from archs.errors import IncompatibleWeightsError

from . import distributed as D
from .data import ImageSet, PatchSampler, StepBatches, scan_folders, val_pairs_from_arrays, val_pairs_from_folder
from .degradations import Degradation, RealWorldDegradation
from .discriminators import make_discriminator
from .ema import EMA
from .losses import PixelLoss
from .models import LoadedModel, build_preset, freeze_norm_statistics, init_as_bilinear, load_pretrained, parameter_count
from .schedule import Schedule
from .synthetic import make_images

log = logging.getLogger("flexsr")


@dataclass
class Run:
    """Everything a step touches."""

    args: object
    dist: D.DistInfo
    loaded: LoadedModel
    model: nn.Module
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    scheduler: Schedule
    scaler: torch.amp.GradScaler
    sampler: PatchSampler
    pixel_loss: PixelLoss
    val_pairs: list
    disc: nn.Module | None = None
    d_optimizer: torch.optim.Optimizer | None = None
    wrapped: nn.Module | None = None
    d_wrapped: nn.Module | None = None
    teacher: nn.Module | None = None  # --distill: the frozen model the clean anchor patches are held to
    dtype: torch.dtype | None = None  # autocast dtype (None: float32 throughout)
    frozen_params: list = field(default_factory=list)  # the body's parameters while --freeze-body-steps holds them
    freeze_until: int = 0  # first step that trains the body (0: nothing frozen)
    t_start: float = 0.0  # when this process started the run
    wall_before: float = 0.0  # wall seconds of earlier sessions of the same run (from the checkpoint)

    def wall_seconds(self) -> float:
        """Wall time of the whole run, over every --resume."""
        return self.wall_before + time.time() - self.t_start

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context for the run's AMP dtype, or one that does nothing."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.dtype)


def amp_dtype(args, device: torch.device) -> torch.dtype | None:
    mode = args.amp
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if mode == "none":
        return None
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 or none on CPU.")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def make_model(args) -> LoadedModel:
    if args.pretrained:
        return load_pretrained(args.pretrained, args.scale)
    scale = args.scale or 2
    model = build_preset(args.arch, scale, args.arch_args)
    if args.init != "random":
        done = init_as_bilinear(model)
        if done:
            log.info("Init: the tail starts as bilinear upsampling (--init %s).", args.init)
        elif args.init == "bilinear":
            raise ValueError(f"--init bilinear: {args.arch} has no pixel-shuffle tail fed by a short cut; use --init random.")
    keys = list(model.state_dict())
    return LoadedModel(model.train(), scale, args.arch, keys, [])


def make_data(args, scale: int, is_main: bool) -> tuple[ImageSet, list]:
    """Training images (folders or synthetic) and validation pairs."""
    if args.data:
        images = scan_folders(args.data, args.patch_size, args.small_images, args.cache_mb)
    else:
        size = max(args.synthetic_size, args.patch_size)
        t = time.time()
        arrays = make_images(args.synthetic_count, (size, size), args.seed, "train")
        images = ImageSet(arrays=arrays, min_size=args.patch_size)
        log.info("Generated %d synthetic anime-style images of %d px (seed %d) in %.1f s.", len(arrays), size, args.seed, time.time() - t)
    val_pairs: list = []
    if is_main:
        if args.val:
            val_pairs = val_pairs_from_folder(args.val, scale, args.val_crop, args.val_max_images,
                                              getattr(args, "val_lr", None) or ("bicubic",))
        elif not args.data and args.synthetic_val_count > 0:
            size = args.synthetic_val_size
            held = make_images(args.synthetic_val_count, (size, size), args.seed, "val")
            val_pairs = val_pairs_from_arrays([(f"heldout_{i:02d}", a) for i, a in enumerate(held)], scale, args.val_crop)
        if val_pairs:
            specs = getattr(args, "val_lr", None)
            log.info("Validation: %d images (LR by %s).", len(val_pairs),
                     ", ".join(specs) + ", one pair per image and kind" if specs else "antialiased bicubic")
    return images, val_pairs


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def build_run(args, dist: D.DistInfo) -> Run:
    """Seed, then build the model, the data, the losses, AdamW and its schedule, the AMP scaler, the EMA and the
    discriminator, in this order (it fixes the order of the random draws)."""
    t_start = time.time()
    _seed_all(args.seed)
    loaded = make_model(args)
    scale = loaded.scale
    model = loaded.model.to(dist.device)
    log.info("Model: %s x%d, %s parameters%s.", loaded.architecture, scale, f"{parameter_count(model):,}",
             f", {len(loaded.reinitialized)} tensors re-initialized" if args.pretrained and loaded.reinitialized else "")
    if args.patch_size % scale:
        raise ValueError(f"argument --patch-size: invalid value {args.patch_size}: must be a multiple of the model's "
                         f"scale {scale} (from {args.pretrained or '--scale'}); e.g. {args.patch_size // scale * scale or scale}.")
    norm_mode = getattr(args, "norm_stats", "auto")
    if norm_mode == "frozen" or (norm_mode == "auto" and args.pretrained):
        frozen_norms = freeze_norm_statistics(model)
        if frozen_norms:
            log.info("Norm statistics: %d batch-norm layers keep their running statistics (--norm-stats %s).",
                     frozen_norms, norm_mode)
    images, val_pairs = make_data(args, scale, dist.is_main)
    if getattr(args, "degradation", "classic") == "real":
        degradation = RealWorldDegradation(scale=scale, clean_prob=args.clean_prob)
        log.info("Degradation: real-world, two rounds (training/degradations.py RealWorldDegradation); "
                 "%.0f%% of patches clean (MATLAB bicubic only).", 100 * args.clean_prob)
    else:
        degradation = Degradation(
            scale=scale, modes=tuple(args.downscale), blur=args.blur, blur_prob=args.blur_prob,
            noise=args.noise, noise_prob=args.noise_prob, jpeg=args.jpeg, jpeg_prob=args.jpeg_prob,
        )
    anchors = args.distill_batch if getattr(args, "distill", None) else 0
    sampler = PatchSampler(images, args.patch_size, args.batch_size, degradation, args.seed, not args.no_augment, anchors)
    l1_warmup = args.steps // 2 if args.l1_warmup is None or args.l1_warmup < 0 else args.l1_warmup
    gan_start = l1_warmup if args.gan_start is None or args.gan_start < 0 else args.gan_start
    pixel_loss = PixelLoss(args.edge_weight)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    for g in optimizer.param_groups:
        g["initial_lr"] = args.lr
    scheduler = Schedule(args, l1_warmup, gan_start)
    dtype = amp_dtype(args, dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=dtype == torch.float16)
    ema = EMA(model, args.ema) if args.ema > 0 else None
    run = Run(args, dist, loaded, model, ema, optimizer, scheduler, scaler, sampler, pixel_loss, val_pairs, dtype=dtype,
              t_start=t_start)
    if args.gan:
        run.disc = make_discriminator(args.gan, args.patch_size, spectral_norm=args.gan_spectral_norm,
                                      **(args.gan_args or {})).to(dist.device)
        run.d_optimizer = torch.optim.AdamW(run.disc.parameters(), lr=args.gan_lr, betas=(0.0, 0.99), weight_decay=0.0)
        log.info("GAN: %s discriminator (%s parameters), %s loss, weight %g, from step %d.",
                 args.gan, f"{parameter_count(run.disc):,}", args.gan_loss, args.gan_weight, gan_start)
    if anchors:  # last: building it draws random numbers, which must not shift the draws above
        run.teacher = load_teacher(args.distill, scale, dist.device)
        log.info("Distillation: %d clean (MATLAB-bicubic) patches per step held to %s's output, weight %g.",
                 anchors, args.distill, args.distill_weight)
    return run


def load_teacher(path: str, scale: int, device: torch.device) -> nn.Module:
    """The frozen ``--distill`` model (eval mode, no gradients), which must upscale by the run's ``scale``."""
    import archs

    desc = archs.load_model(path)
    if int(desc.scale) != scale:
        raise IncompatibleWeightsError(f"--distill {path}: a x{desc.scale} model cannot guide a x{scale} run; "
                                       f"give the x{scale} checkpoint")
    return desc.model.to(device).eval().requires_grad_(False)


def freeze_body(run: Run, start: int) -> None:
    """With a re-initialized tail, hold the body for the first --freeze-body-steps steps.

    Its gradients are dropped before the optimizer step, so AdamW leaves those weights (and their moments)
    untouched; the same under DDP, whose wrapper needs no rebuilding when they thaw.
    """
    loaded, args = run.loaded, run.args
    body_names = set(loaded.kept)
    run.frozen_params = [p for n, p in run.model.named_parameters() if n in body_names] if loaded.reinitialized else []
    run.freeze_until = args.freeze_body_steps if run.frozen_params else 0
    if start < run.freeze_until:
        log.info("Body (%d tensors from %s) frozen for the first %d steps.", len(run.frozen_params), args.pretrained,
                 run.freeze_until)


def wrap_ddp(run: Run) -> None:
    if not run.dist.enabled:
        run.wrapped, run.d_wrapped = run.model, run.disc
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [run.dist.device.index] if run.dist.device.type == "cuda" else None
    run.wrapped = DDP(run.model, device_ids=ids)
    if run.disc is not None:
        run.d_wrapped = DDP(run.disc, device_ids=ids)


def make_loader(run: Run, start: int) -> torch.utils.data.DataLoader:
    """Batches ``start`` .. --steps of this rank (batch k is a pure function of seed, k and rank)."""
    args, dist = run.args, run.dist
    return torch.utils.data.DataLoader(
        StepBatches(run.sampler, start, args.steps, dist.rank), batch_size=None, shuffle=False,
        num_workers=args.workers, pin_memory=dist.device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if args.workers > 0 else None,
        worker_init_fn=_ignore_interrupts if args.workers > 0 else None,
    )


def _ignore_interrupts(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which finishes its step and saves a checkpoint."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
