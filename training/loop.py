"""The training loop: model, data, losses, AdamW + schedule, EMA, AMP, validation, checkpoints, DDP.

``train(args)`` takes the namespace ``training.finetune`` parses and returns a summary dict. Every
file of a run goes under ``args.out``; in a DDP run only rank 0 writes.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed as D
from .checkpoint import remove_stale_temporaries, resumable_checkpoint, rng_state, save_checkpoint, truncate_jsonl
from .data import PatchSampler, StepBatches, scan_folders, val_pairs_from_arrays, val_pairs_from_folder, ImageSet
from .degradations import Degradation
from .discriminators import make_discriminator
from .ema import EMA
from .export import finish
from .losses import PixelLoss, discriminator_loss, generator_adversarial_loss
from .metrics import evaluate_pairs
from .models import LoadedModel, build_preset, freeze_norm_statistics, init_as_bilinear, load_pretrained, parameter_count
from .resume import CHECKPOINT_NAME, checkpoint_state, restore
from .runlog import MetricsLog, setup_file_logging
from .schedule import Schedule
from .synthetic import make_images

log = logging.getLogger("flexsr")


# --------------------------------------------------------------------------------------------------
# Pieces


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
    t_start: float = 0.0  # when this process started the run
    wall_before: float = 0.0  # wall seconds of earlier sessions of the same run (from the checkpoint)

    def wall_seconds(self) -> float:
        """Wall time of the whole run, over every --resume."""
        return self.wall_before + time.time() - self.t_start


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
            val_pairs = val_pairs_from_folder(args.val, scale, args.val_crop, args.val_max_images)
        elif not args.data and args.synthetic_val_count > 0:
            size = args.synthetic_val_size
            held = make_images(args.synthetic_val_count, (size, size), args.seed, "val")
            val_pairs = val_pairs_from_arrays([(f"heldout_{i:02d}", a) for i, a in enumerate(held)], scale, args.val_crop)
        if val_pairs:
            log.info("Validation: %d images (LR by antialiased bicubic).", len(val_pairs))
    return images, val_pairs


def wrap_ddp(run: Run) -> None:
    if not run.dist.enabled:
        run.wrapped, run.d_wrapped = run.model, run.disc
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [run.dist.device.index] if run.dist.device.type == "cuda" else None
    run.wrapped = DDP(run.model, device_ids=ids)
    if run.disc is not None:
        run.d_wrapped = DDP(run.disc, device_ids=ids)


# --------------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def validate(run: Run) -> dict:
    model = run.ema.model if run.ema else run.model
    was_training = model.training
    model.eval()
    dev = run.dist.device

    def upscale(lr: torch.Tensor) -> torch.Tensor:
        return model(lr.to(dev)).float().clamp(0, 1).cpu()

    res = evaluate_pairs(upscale, run.val_pairs, run.loaded.scale)
    model.train(was_training)
    return {k: v for k, v in res.items() if not k.startswith("psnr/")}


# --------------------------------------------------------------------------------------------------
# The loop


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def train(args) -> dict:
    """Run (or resume) a fine-tune described by ``args``; returns a summary dict (rank 0)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = D.setup(args.device)
    out = Path(args.out)
    handler = None
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        handler = setup_file_logging(out)
        remove_stale_temporaries(out)  # full-size leftovers of a run killed mid-write
    else:
        log.setLevel(logging.WARNING)
    try:
        return _train(args, dist, out)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        D.cleanup()


def _train(args, dist: D.DistInfo, out: Path) -> dict:
    t_start = time.time()
    _seed_all(args.seed)
    loaded = make_model(args)
    scale = loaded.scale
    model = loaded.model.to(dist.device)
    log.info("Model: %s x%d, %s parameters%s.", loaded.architecture, scale, f"{parameter_count(model):,}",
             f", {len(loaded.reinitialized)} tensors re-initialized" if args.pretrained and loaded.reinitialized else "")
    if args.patch_size % scale:
        raise ValueError(f"--patch-size {args.patch_size} must be a multiple of the scale {scale}.")
    norm_mode = getattr(args, "norm_stats", "auto")
    if norm_mode == "frozen" or (norm_mode == "auto" and args.pretrained):
        frozen_norms = freeze_norm_statistics(model)
        if frozen_norms:
            log.info("Norm statistics: %d batch-norm layers keep their running statistics (--norm-stats %s).",
                     frozen_norms, norm_mode)
    images, val_pairs = make_data(args, scale, dist.is_main)
    degradation = Degradation(
        scale=scale, modes=tuple(args.downscale), blur=args.blur, blur_prob=args.blur_prob,
        noise=args.noise, noise_prob=args.noise_prob, jpeg=args.jpeg, jpeg_prob=args.jpeg_prob,
    )
    sampler = PatchSampler(images, args.patch_size, args.batch_size, degradation, args.seed, not args.no_augment)
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
    run = Run(args, dist, loaded, model, ema, optimizer, scheduler, scaler, sampler, pixel_loss, val_pairs, t_start=t_start)
    if args.gan:
        run.disc = make_discriminator(args.gan, args.patch_size, spectral_norm=args.gan_spectral_norm,
                                      **(args.gan_args or {})).to(dist.device)
        run.d_optimizer = torch.optim.AdamW(run.disc.parameters(), lr=args.gan_lr, betas=(0.0, 0.99), weight_decay=0.0)
        log.info("GAN: %s discriminator (%s parameters), %s loss, weight %g, from step %d.",
                 args.gan, f"{parameter_count(run.disc):,}", args.gan_loss, args.gan_weight, gan_start)

    start = 0
    metrics = MetricsLog(out, dist.is_main, args.tensorboard)
    ckpt_path = out / CHECKPOINT_NAME
    if args.resume:
        path = ckpt_path if args.resume == "auto" else Path(args.resume)
        found = resumable_checkpoint(path, map_location=dist.device)  # falls back to checkpoint.prev.pt
        if found is not None:
            state, path = found
            start = restore(run, state)
            if dist.is_main:
                kept = truncate_jsonl(metrics.path, start)
                log.info("Resumed from %s at step %d (%d metric records kept).", path, start, kept)
        elif args.resume != "auto":
            raise FileNotFoundError(f"--resume {path}: no such checkpoint.")
        else:
            log.info("--resume: no checkpoint in %s yet; starting from step 0.", out)
    elif dist.is_main and metrics.path.exists():
        metrics.path.unlink()  # a fresh run starts a fresh log

    # Freezing the body: its gradients are dropped before the optimizer step, so AdamW leaves those weights
    # (and their moments) untouched; the same under DDP, whose wrapper needs no rebuilding when they thaw.
    body_names = set(loaded.kept)
    frozen_params = [p for n, p in model.named_parameters() if n in body_names] if loaded.reinitialized else []
    freeze_until = args.freeze_body_steps if frozen_params else 0
    if start < freeze_until:
        log.info("Body (%d tensors from %s) frozen for the first %d steps.", len(frozen_params), args.pretrained, freeze_until)
    wrap_ddp(run)

    loader = torch.utils.data.DataLoader(
        StepBatches(sampler, start, args.steps, dist.rank), batch_size=None, shuffle=False,
        num_workers=args.workers, pin_memory=dist.device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if args.workers > 0 else None,
    )
    step_sleep = float(os.environ.get("FLEXSR_DEBUG_STEP_SLEEP", "0") or 0)  # tests: widen the kill window
    progress = None
    if dist.is_main and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                        mininterval=1.0)
    last_val: dict = {}
    stopped_early = False
    step = start
    t_loop, seen = time.time(), 0
    dev = dist.device
    autocast = (lambda: torch.autocast(dev.type, dtype=dtype)) if dtype is not None else None

    t_step = time.time()
    data_s = compute_s = 0.0  # time waiting for batches vs. time in the step, since the last log line
    for step, (lr_img, hr_img) in enumerate(loader, start=start):
        t_got = time.time()
        data_s += t_got - t_step
        if freeze_until and step == freeze_until:
            log.info("Step %d: body unfrozen.", step)
        lr_img = lr_img.to(dev, non_blocking=True)
        hr_img = hr_img.to(dev, non_blocking=True)
        gan_on = run.disc is not None and scheduler.gan_on(step)
        lr_now = args.lr * scheduler.lr_factor(step)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_now / args.lr if args.lr > 0 else 0.0

        optimizer.zero_grad(set_to_none=True)
        with autocast() if autocast else _null():
            sr = run.wrapped(lr_img)
        loss, parts = pixel_loss(sr.float(), hr_img, scheduler.edge_on(step))
        if gan_on:
            with autocast() if autocast else _null():
                fake_logits = run.d_wrapped(sr)
            g_adv = generator_adversarial_loss(fake_logits, args.gan_loss)
            loss = loss + args.gan_weight * g_adv
            parts["g_adv"] = g_adv.detach()
        scaler.scale(loss).backward()
        if step < freeze_until:
            for p_ in frozen_params:
                p_.grad = None
        if args.clip_grad > 0:
            scaler.unscale_(optimizer)
            parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad).detach().float()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model, step)
        if gan_on:
            run.d_optimizer.zero_grad(set_to_none=True)
            with autocast() if autocast else _null():
                real_logits = run.d_wrapped(hr_img)
                fake_logits = run.d_wrapped(sr.detach())
            d_loss = discriminator_loss(real_logits, fake_logits, args.gan_loss)
            d_loss.backward()
            run.d_optimizer.step()
            parts["d_loss"] = d_loss.detach()

        # One collective per step: the loss parts averaged over ranks, plus rank 0's step time and stop flag
        # (so every rank follows the same schedule).
        names = ["loss", *sorted(parts)]
        step_time = time.time() - t_step
        compute_s += time.time() - t_got
        stop = float(args.time_limit > 0 and time.time() - t_start > args.time_limit * 60)
        own = [stop * dist.world_size, step_time * dist.world_size] if dist.is_main else [0.0, 0.0]
        vec = torch.stack([loss.detach().float().cpu(), *[parts[n].float().cpu() for n in names[1:]]])
        vec = torch.cat([vec.double(), torch.tensor(own, dtype=torch.float64)])
        vec = D.all_reduce_mean(vec.to(dev) if dev.type == "cuda" else vec, dist).cpu()
        done = step + 1
        had_extra = scheduler.extra > 0
        scheduler.observe(float(vec[-1]) if done - start > Schedule.UNTIMED_STEPS else None)
        if scheduler.extra > 0 and not had_extra:
            log.info("--time-budget %g min: steps take %.3f s, more than the %.3f s that %d steps allow; the schedule "
                     "now also advances by time.", args.time_budget, scheduler.step_seconds,
                     scheduler.budget / args.steps, args.steps)
        seen += lr_img.shape[0] * dist.world_size
        record = {"kind": "train", "step": done, **{n: float(v) for n, v in zip(names, vec[:-2].tolist())}, "lr": lr_now}
        elapsed = time.time() - t_loop
        record["img_per_s"] = seen / max(elapsed, 1e-9)
        record["elapsed_s"] = time.time() - t_start
        metrics.write(record)
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}", refresh=False)
            progress.update(1)
        if dist.is_main and args.log_every > 0 and done % args.log_every == 0:
            n_img = lr_img.shape[0] * min(args.log_every, done - start)
            loader_rate, model_rate = n_img / max(data_s, 1e-9), n_img / max(compute_s, 1e-9)
            log.info("step %d/%d  loss %.5f  lr %.2e  %.1f img/s  (loader %.1f img/s against the model's %.1f img/s: %s)",
                     done, args.steps, record["loss"], record["lr"], record["img_per_s"], loader_rate, model_rate,
                     "the loader keeps up" if loader_rate >= model_rate else "the model waits for data")
            metrics.write({"kind": "throughput", "step": done, "loader_img_per_s": loader_rate,
                           "model_img_per_s": model_rate})
            data_s = compute_s = 0.0
        stop_now = vec[-2].item() >= 1.0
        last = scheduler.finished(done) or stop_now
        if dist.is_main and run.val_pairs and ((args.val_every > 0 and done % args.val_every == 0) or last):
            last_val = validate(run)
            metrics.write({"kind": "val", "step": done, **{k: v for k, v in last_val.items() if k != "n"},
                           "gain_db": last_val["psnr"] - last_val["bicubic_psnr"]})
            log.info("step %d: held-out Y-PSNR %.3f dB (bicubic %.3f, %+.3f dB), SSIM %.4f (bicubic %.4f)", done,
                     last_val["psnr"], last_val["bicubic_psnr"], last_val["psnr"] - last_val["bicubic_psnr"],
                     last_val["ssim"], last_val["bicubic_ssim"])
        if (args.save_every > 0 and done % args.save_every == 0) or last:
            rngs = D.gather_objects(rng_state(), dist)
            if dist.is_main:
                save_checkpoint(out / CHECKPOINT_NAME, checkpoint_state(run, done, rngs))
        if step_sleep:
            time.sleep(step_sleep)
        t_step = time.time()
        if stop_now:
            stopped_early = True
            log.warning("Stopped by --time-limit %g min at step %d of %d.", args.time_limit, done, args.steps)
            break
        if last:
            if done < args.steps:
                log.info("--time-budget %g min: schedule completed in %d of %d steps.", args.time_budget, done, args.steps)
            break
    if progress is not None:
        progress.close()
    metrics.close()
    D.barrier(dist)
    if not dist.is_main:
        return {}
    if run.val_pairs and not last_val:  # e.g. --resume of a finished run
        last_val = validate(run)
    return finish(run, out, start, stopped_early, last_val, time.time() - t_start)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
