"""The training loop: ``train(args)`` builds the run (``training.run``), resumes it (``training.resume``), takes
optimisation steps (``training.step``) with the bookkeeping after each (one all-reduce, metrics and log lines,
validation, checkpoints, when to stop) and exports the result (``training.export``).

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
from .metrics import evaluate_pairs
from .resume import resume_or_start, save_run
from .run import Run, build_run, freeze_body, make_loader, wrap_ddp
from .runlog import MetricsLog, setup_file_logging
from .schedule import Schedule
from .step import optimisation_step

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
    book = Bookkeeping(run, metrics, out, start)
    for step, (lr_img, hr_img) in enumerate(loader, start=start):
        book.batch_arrived()
        loss, parts, lr_now = optimisation_step(run, step, lr_img, hr_img)
        if book.after_step(step, loss, parts, lr_now, lr_img.shape[0]):
            break
    book.close()
    metrics.close()
    D.barrier(dist)
    if not dist.is_main:
        return {}
    last_val = book.last_val
    if run.val_pairs and not last_val:  # e.g. --resume of a finished run
        last_val = validate(run)
    return finish(run, out, start, book.stopped_early, last_val, time.time() - run.t_start)


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


class Bookkeeping:
    """What follows each step: one all-reduce (the loss parts, rank 0's step time and stop flag), the schedule's
    clock, the metrics record, the progress bar and log line (the loader's img/s against the model's), validation,
    the checkpoint, and whether the run stops."""

    def __init__(self, run: Run, metrics: MetricsLog, out: Path, start: int):
        args, dist = run.args, run.dist
        self.run, self.metrics, self.out, self.start = run, metrics, out, start
        self.step_sleep = float(os.environ.get("FLEXSR_DEBUG_STEP_SLEEP", "0") or 0)  # tests: widen the kill window
        self.progress = None
        if dist.is_main and not args.no_progress:
            from tqdm import tqdm

            self.progress = tqdm(total=args.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                                 mininterval=1.0)
        self.last_val: dict = {}  # the latest validation (rank 0)
        self.stopped_early = False  # by --time-limit
        self.t_loop, self.seen = time.time(), 0  # images trained on since t_loop, over all ranks
        self.t_step = time.time()  # when the latest step ended (its batch was asked for)
        self.t_got = self.t_step  # when the current step's batch arrived
        self.data_s = self.compute_s = 0.0  # time waiting for batches vs. time in the step, since the last log line

    def batch_arrived(self) -> None:
        self.t_got = time.time()
        self.data_s += self.t_got - self.t_step

    def after_step(self, step: int, loss: torch.Tensor, parts: dict, lr_now: float, batch_size: int) -> bool:
        """Book step ``step`` (0-based) of ``batch_size`` patches per rank; True when the run ends with it."""
        names, vec = self._all_reduce(loss, parts)
        done = step + 1
        self._advance_schedule(done, float(vec[-1]))
        self._record(done, names, vec, lr_now, batch_size)
        stop_now = vec[-2].item() >= 1.0
        last = self.run.scheduler.finished(done) or stop_now
        self._validate_and_save(done, last)
        if self.step_sleep:
            time.sleep(self.step_sleep)
        self.t_step = time.time()
        return self._stops(done, stop_now, last)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def _all_reduce(self, loss: torch.Tensor, parts: dict) -> tuple[list[str], torch.Tensor]:
        """One collective per step: the loss parts averaged over ranks, plus rank 0's step time and stop flag
        (so every rank follows the same schedule). Returns the parts' names and [*parts, stop, step seconds]."""
        run, args, dist = self.run, self.run.args, self.run.dist
        dev = dist.device
        names = ["loss", *sorted(parts)]
        step_time = time.time() - self.t_step
        self.compute_s += time.time() - self.t_got
        stop = float(args.time_limit > 0 and time.time() - run.t_start > args.time_limit * 60)
        own = [stop * dist.world_size, step_time * dist.world_size] if dist.is_main else [0.0, 0.0]
        vec = torch.stack([loss.detach().float().cpu(), *[parts[n].float().cpu() for n in names[1:]]])
        vec = torch.cat([vec.double(), torch.tensor(own, dtype=torch.float64)])
        return names, D.all_reduce_mean(vec.to(dev) if dev.type == "cuda" else vec, dist).cpu()

    def _advance_schedule(self, done: int, step_seconds: float) -> None:
        """Tell the schedule how long the step took (but for the first, untimed steps of a session)."""
        args, scheduler = self.run.args, self.run.scheduler
        had_extra = scheduler.extra > 0
        scheduler.observe(step_seconds if done - self.start > Schedule.UNTIMED_STEPS else None)
        if scheduler.extra > 0 and not had_extra:
            log.info("--time-budget %g min: steps take %.3f s, more than the %.3f s that %d steps allow; the schedule "
                     "now also advances by time.", args.time_budget, scheduler.step_seconds,
                     scheduler.budget / args.steps, args.steps)

    def _record(self, done: int, names: list[str], vec: torch.Tensor, lr_now: float, batch_size: int) -> None:
        """The step's metrics record and progress bar; every --log-every steps a log line and a throughput record."""
        run, args, dist = self.run, self.run.args, self.run.dist
        self.seen += batch_size * dist.world_size
        record = {"kind": "train", "step": done, **{n: float(v) for n, v in zip(names, vec[:-2].tolist())}, "lr": lr_now}
        elapsed = time.time() - self.t_loop
        record["img_per_s"] = self.seen / max(elapsed, 1e-9)
        record["elapsed_s"] = time.time() - run.t_start
        self.metrics.write(record)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}", refresh=False)
            self.progress.update(1)
        if dist.is_main and args.log_every > 0 and done % args.log_every == 0:
            n_img = batch_size * min(args.log_every, done - self.start)
            loader_rate, model_rate = n_img / max(self.data_s, 1e-9), n_img / max(self.compute_s, 1e-9)
            log.info("step %d/%d  loss %.5f  lr %.2e  %.1f img/s  (loader %.1f img/s against the model's %.1f img/s: %s)",
                     done, args.steps, record["loss"], record["lr"], record["img_per_s"], loader_rate, model_rate,
                     "the loader keeps up" if loader_rate >= model_rate else "the model waits for data")
            self.metrics.write({"kind": "throughput", "step": done, "loader_img_per_s": loader_rate,
                                "model_img_per_s": model_rate})
            self.data_s = self.compute_s = 0.0

    def _validate_and_save(self, done: int, last: bool) -> None:
        """Validate every --val-every steps and at the end (rank 0); checkpoint every --save-every steps and at the end."""
        run, args = self.run, self.run.args
        if run.dist.is_main and run.val_pairs and ((args.val_every > 0 and done % args.val_every == 0) or last):
            self.last_val = val = validate(run)
            self.metrics.write({"kind": "val", "step": done, **{k: v for k, v in val.items() if k != "n"},
                                "gain_db": val["psnr"] - val["bicubic_psnr"]})
            log.info("step %d: held-out Y-PSNR %.3f dB (bicubic %.3f, %+.3f dB), SSIM %.4f (bicubic %.4f)", done,
                     val["psnr"], val["bicubic_psnr"], val["psnr"] - val["bicubic_psnr"], val["ssim"], val["bicubic_ssim"])
        if (args.save_every > 0 and done % args.save_every == 0) or last:
            save_run(run, self.out, done)

    def _stops(self, done: int, stop_now: bool, last: bool) -> bool:
        args = self.run.args
        if stop_now:
            self.stopped_early = True
            log.warning("Stopped by --time-limit %g min at step %d of %d.", args.time_limit, done, args.steps)
            return True
        if last:
            if done < args.steps:
                log.info("--time-budget %g min: schedule completed in %d of %d steps.", args.time_budget, done, args.steps)
            return True
        return False
