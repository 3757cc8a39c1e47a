"""One optimisation step: the learning rate, the generator's forward pass and loss (pixel, plus the adversarial
term once the GAN is on), backward, the frozen body, gradient clipping, AdamW, the EMA, then the
discriminator's own step."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .losses import discriminator_loss, generator_adversarial_loss

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("flexsr")


def optimisation_step(run: Run, step: int, lr_img: torch.Tensor, hr_img: torch.Tensor) -> tuple[torch.Tensor, dict, float]:
    """Train on one batch (LR ``[B, 3, h, w]``, HR ``[B, 3, h*scale, w*scale]``, 0..1) at step ``step`` (0-based).

    Returns the loss, its named parts (detached; ``grad_norm`` and the GAN's terms among them when they apply) and
    the learning rate of the step.
    """
    dev = run.dist.device
    if run.freeze_until and step == run.freeze_until:
        log.info("Step %d: body unfrozen.", step)
    lr_img = lr_img.to(dev, non_blocking=True)
    hr_img = hr_img.to(dev, non_blocking=True)
    gan_on = run.disc is not None and run.scheduler.gan_on(step)
    lr_now = set_learning_rate(run, step)

    run.optimizer.zero_grad(set_to_none=True)
    with run.autocast():
        sr = run.wrapped(lr_img)
    b = run.args.batch_size
    anchored = run.teacher is not None and sr.shape[0] > b
    if anchored:  # the last patches are --distill's clean anchors: held to the frozen model's output, not the HR
        sr, sr_anchor, lr_anchor, hr_img = sr[:b], sr[b:], lr_img[b:], hr_img[:b]
    loss, parts = generator_loss(run, step, sr, hr_img, gan_on)
    if anchored:
        distill = distillation_loss(run, sr_anchor, lr_anchor)
        loss = loss + run.args.distill_weight * distill
        parts["distill_l1"] = distill.detach()
    update_generator(run, step, loss, parts)
    if gan_on:
        parts["d_loss"] = discriminator_step(run, sr, hr_img)
    return loss, parts, lr_now


def distillation_loss(run: Run, sr: torch.Tensor, lr_img: torch.Tensor) -> torch.Tensor:
    """L1 between the model's output ``sr`` on clean LR ``lr_img`` and the frozen ``--distill`` model's output on it
    (float32, clamped to 0..1 as a saved image is)."""
    with torch.no_grad(), run.autocast():
        target = run.teacher(lr_img)
    return F.l1_loss(sr.float(), target.float().clamp(0, 1))


def set_learning_rate(run: Run, step: int) -> float:
    """Set the schedule's learning rate for ``step`` on every parameter group; returns it."""
    args = run.args
    lr_now = args.lr * run.scheduler.lr_factor(step)
    for g in run.optimizer.param_groups:
        g["lr"] = g["initial_lr"] * lr_now / args.lr if args.lr > 0 else 0.0
    return lr_now


def generator_loss(run: Run, step: int, sr: torch.Tensor, hr_img: torch.Tensor, gan_on: bool) -> tuple[torch.Tensor, dict]:
    """The pixel loss (edge-weighted once the schedule says so) plus, with the GAN on, the weighted adversarial term."""
    args = run.args
    loss, parts = run.pixel_loss(sr.float(), hr_img, run.scheduler.edge_on(step))
    if gan_on:
        with run.autocast():
            fake_logits = run.d_wrapped(sr)
        g_adv = generator_adversarial_loss(fake_logits, args.gan_loss)
        loss = loss + args.gan_weight * g_adv
        parts["g_adv"] = g_adv.detach()
    return loss, parts


def update_generator(run: Run, step: int, loss: torch.Tensor, parts: dict) -> None:
    """Backward, drop the frozen body's gradients, clip (``parts["grad_norm"]``), step AdamW, update the EMA."""
    args, scaler, optimizer = run.args, run.scaler, run.optimizer
    scaler.scale(loss).backward()
    if step < run.freeze_until:
        for p in run.frozen_params:
            p.grad = None
    if args.clip_grad > 0:
        scaler.unscale_(optimizer)
        parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.clip_grad).detach().float()
    scaler.step(optimizer)
    scaler.update()
    if run.ema is not None:
        run.ema.update(run.model, step)


def discriminator_step(run: Run, sr: torch.Tensor, hr_img: torch.Tensor) -> torch.Tensor:
    """One step of the discriminator on real ``hr_img`` against the (detached) ``sr``; returns its loss, detached."""
    run.d_optimizer.zero_grad(set_to_none=True)
    with run.autocast():
        real_logits = run.d_wrapped(hr_img)
        fake_logits = run.d_wrapped(sr.detach())
    d_loss = discriminator_loss(real_logits, fake_logits, run.args.gan_loss)
    d_loss.backward()
    run.d_optimizer.step()
    return d_loss.detach()
