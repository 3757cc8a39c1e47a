"""The training loop: ``train(args)`` builds the run (``training.run``), resumes it (``training.resume``), trains
(AMP, GAN, validation, checkpoints, DDP) and exports the result (``training.export``).

``train(args)`` takes the namespace ``training.finetune`` parses and returns a summary dict. Every
file of a run goes under ``args.out``; in a DDP run only rank 0 writes.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import torch

from . import distributed as D
from .checkpoint import remove_stale_temporaries
from .export import finish
from .losses import discriminator_loss, generator_adversarial_loss
from .metrics import evaluate_pairs
from .resume import resume_or_start, save_run
from .run import Run, build_run, freeze_body, make_loader, wrap_ddp
from .runlog import MetricsLog, setup_file_logging
from .schedule import Schedule

log = logging.getLogger("flexsr")


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
    run = build_run(args, dist)
    metrics = MetricsLog(out, dist.is_main, args.tensorboard)
    start = resume_or_start(run, metrics, out)
    freeze_body(run, start)
    wrap_ddp(run)
    loader = make_loader(run, start)
    model, ema, optimizer, scheduler, scaler, pixel_loss = (run.model, run.ema, run.optimizer, run.scheduler, run.scaler,
                                                             run.pixel_loss)
    frozen_params, freeze_until, dtype, t_start = run.frozen_params, run.freeze_until, run.dtype, run.t_start
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
            save_run(run, out, done)
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


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
