"""The training loop: ``train(args)`` builds the run (``training.run``), resumes it (``training.resume``), takes
optimisation steps (``training.step``) with the bookkeeping after each (one all-reduce, metrics and log lines,
validation, checkpoints, when to stop) and exports the result (``training.export``).

``train(args)`` takes the namespace ``training.finetune`` parses and returns a summary dict. Every
file of a run goes under ``args.out``; in a DDP run only rank 0 writes. A fresh run validates its starting
model first (the baseline every later score is compared with); the best validated weights are kept (in memory
and in every checkpoint) and exported unless ``--export last``. SIGINT / SIGTERM finish the step in hand, write
a checkpoint and raise :class:`TrainingInterrupted` (the command line prints how to resume and exits 130 / 143).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from archs.errors import FlexSRError

from . import distributed as D
from .checkpoint import remove_stale_temporaries
from .export import finish
from .metrics import evaluate_pairs
from .resume import resume_or_start, save_run
from .run import Run, build_run, freeze_body, make_loader, wrap_ddp
from .runlog import MetricsLog, RunLock, setup_file_logging
from .schedule import Schedule
from .step import optimisation_step
from .threads import ThreadTuner

log = logging.getLogger("flexsr")


class TrainingInterrupted(FlexSRError):
    """SIGINT or SIGTERM stopped the run after a step; its checkpoint is saved. ``exit_code``: 130 / 143."""

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum


class StopSignals:
    """While active (main thread only), SIGINT and SIGTERM set ``received`` instead of killing the process, so the
    step in hand finishes and a checkpoint is written; a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last checkpoint stays)
        self.received = signum
        log.warning("%s received: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once).",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(args) -> dict:
    """Run (or resume) a fine-tune described by ``args``; returns a summary dict (rank 0)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = D.setup(args.device)
    out = Path(args.out)
    handler = None
    with contextlib.ExitStack() as stack:
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            stack.enter_context(RunLock(out))  # a second process on the same run folder is refused
            handler = setup_file_logging(out)
            remove_stale_temporaries(out)  # full-size leftovers of a run killed mid-write
        else:
            log.setLevel(logging.WARNING)
        try:
            return _train(args, dist, out)
        except Exception as e:
            if handler is not None:  # the run's own log keeps the error too (the console shows it once, from main)
                handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s: %s", (type(e).__name__, e), None))
            raise
        finally:
            if handler is not None:
                log.removeHandler(handler)
                handler.close()
            D.cleanup()


def _train(args, dist: D.DistInfo, out: Path) -> dict:
    run = build_run(args, dist)
    metrics = MetricsLog(out, dist.is_main, args.tensorboard)
    start, saved_best = resume_or_start(run, metrics, out)
    freeze_body(run, start)
    wrap_ddp(run)
    book = Bookkeeping(run, metrics, out, start, saved_best)
    tuner = ThreadTuner() if not args.threads and dist.device.type == "cpu" else None
    if tuner is not None and tuner.active and dist.is_main:
        log.info("--threads auto: measuring %s threads over the first steps (and every %d min) and keeping the "
                 "faster; pass --threads N to fix it.", " and ".join(map(str, tuner.candidates)), tuner.recheck_s // 60)
    if start == 0 and dist.is_main:
        book.validate_start()
    loader = make_loader(run, start)
    with StopSignals() as signals:
        for step, (lr_img, hr_img) in enumerate(loader, start=start):
            book.batch_arrived()
            if tuner is not None:
                tuner.before_step()
            loss, parts, lr_now = optimisation_step(run, step, lr_img, hr_img)
            if tuner is not None:
                tuner.after_step()
            if book.after_step(step, loss, parts, lr_now, lr_img.shape[0], stop=signals.received is not None):
                break
    book.close()
    metrics.close()
    if signals.received is not None:
        name = signal.Signals(signals.received).name
        raise TrainingInterrupted(f"{name}: stopped after step {book.done} of {args.steps}; checkpoint saved in "
                                  f"{out}.", signals.received, book.done)
    D.barrier(dist)
    if not dist.is_main:
        return {}
    last_val = book.last_val
    if run.val_pairs and not last_val:  # e.g. --resume of a finished run
        last_val = validate(run)
    return finish(run, out, start, book.stopped_early, last_val, time.time() - run.t_start, book.best,
                  book.start_val)


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
    out = {k: v for k, v in res.items() if not k.startswith("psnr/")}
    specs: dict[str, list[float]] = {}
    for k, v in res.items():  # pairs named <image>@<spec>: each spec's mean too
        if k.startswith("psnr/") and "@" in k:
            specs.setdefault(k.rsplit("@", 1)[1], []).append(v)
    if len(specs) > 1:
        out.update({f"psnr[{s}]": sum(v) / len(v) for s, v in specs.items()})
    return out


class Bookkeeping:
    """What follows each step: one all-reduce (the loss parts, rank 0's step time and stop flag), the schedule's
    clock, the metrics record, the progress bar and log line (the loader's img/s against the model's), validation
    (and the best weights so far), the checkpoint, and whether the run stops."""

    def __init__(self, run: Run, metrics: MetricsLog, out: Path, start: int, saved_best: dict | None = None):
        args, dist = run.args, run.dist
        self.run, self.metrics, self.out, self.start = run, metrics, out, start
        self.done = start
        self.step_sleep = float(os.environ.get("FLEXSR_DEBUG_STEP_SLEEP", "0") or 0)  # tests: widen the kill window
        self.progress = None
        if dist.is_main and not args.no_progress:
            from tqdm import tqdm

            self.progress = tqdm(total=args.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                                 mininterval=1.0)
        self.last_val: dict = {}  # the latest validation (rank 0)
        #: the best validation so far: {"step", "psnr", "val", "weights"} (weights: CPU state dict of what validates)
        self.best: dict | None = saved_best
        self.start_val: dict | None = (saved_best or {}).get("start_val")  # the starting model's validation
        self.stopped_early = False  # by --time-limit
        self.t_loop, self.seen = time.time(), 0  # images trained on since t_loop, over all ranks
        self.t_step = time.time()  # when the latest step ended (its batch was asked for)
        self.t_got = self.t_step  # when the current step's batch arrived
        self.data_s = self.compute_s = 0.0  # time waiting for batches vs. time in the step, since the last log line
        self.t_log, self.done_log = time.time(), start  # for steps/s between log lines
        self.loss_form = None  # what the printed loss is (changes when the edge-weighted loss or the GAN starts)

    def batch_arrived(self) -> None:
        self.t_got = time.time()
        self.data_s += self.t_got - self.t_step

    def validate_start(self) -> None:
        """Score the starting model (step 0): the baseline of the run."""
        if not self.run.val_pairs:
            return
        val = validate(self.run)
        self.start_val = {k: v for k, v in val.items()}
        self._keep_if_best(0, val)
        self.metrics.write({"kind": "val", "step": 0, **{k: v for k, v in val.items() if k != "n"},
                            "gain_db": val["psnr"] - val["bicubic_psnr"]})
        log.info("step 0 (the starting model, the baseline): held-out Y-PSNR %.3f dB (bicubic %.3f, %+.3f dB), "
                 "SSIM %.4f%s", val["psnr"], val["bicubic_psnr"], val["psnr"] - val["bicubic_psnr"], val["ssim"],
                 _per_spec(val))

    def after_step(self, step: int, loss: torch.Tensor, parts: dict, lr_now: float, batch_size: int,
                   stop: bool = False) -> bool:
        """Book step ``step`` (0-based) of ``batch_size`` patches per rank; True when the run ends with it.
        ``stop``: a signal asked this process to stop (a checkpoint is written and the run ends here)."""
        names, vec = self._all_reduce(loss, parts, stop)
        done = self.done = step + 1
        self._advance_schedule(done, float(vec[-1]))
        self._note_loss_form(step)
        self._record(done, names, vec, lr_now, batch_size)
        stop_now = vec[-2].item() >= 1.0
        interrupted = stop or vec[-2].item() >= 2.0
        last = self.run.scheduler.finished(done) or stop_now
        if interrupted:
            save_run(self.run, self.out, done, self._best_state())
            return True
        self._validate_and_save(done, last)
        if self.step_sleep:
            time.sleep(self.step_sleep)
        self.t_step = time.time()
        return self._stops(done, stop_now, last)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def _all_reduce(self, loss: torch.Tensor, parts: dict, stop: bool) -> tuple[list[str], torch.Tensor]:
        """One collective per step: the loss parts averaged over ranks, plus rank 0's step time and stop flag
        (1: --time-limit, 2: a signal; so every rank follows the same schedule). Returns the parts' names and
        [*parts, stop, step seconds]."""
        run, args, dist = self.run, self.run.args, self.run.dist
        dev = dist.device
        names = ["loss", *sorted(parts)]
        step_time = time.time() - self.t_step
        self.compute_s += time.time() - self.t_got
        flag = 2.0 if stop else float(args.time_limit > 0 and time.time() - run.t_start > args.time_limit * 60)
        own = [flag * dist.world_size, step_time * dist.world_size] if dist.is_main else [0.0, 0.0]
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
                     "now also advances by time (about %d steps in all).", args.time_budget, scheduler.step_seconds,
                     scheduler.budget / args.steps, args.steps, scheduler.expected_steps(done))

    def _note_loss_form(self, step: int) -> None:
        """A log line whenever the printed loss changes form, so a jump in its value does not read as divergence."""
        run, args = self.run, self.run.args
        edge = args.edge_weight > 0 and run.scheduler.edge_on(step)
        gan = run.disc is not None and run.scheduler.gan_on(step)
        form = (edge, gan)
        if self.loss_form is not None and form != self.loss_form and run.dist.is_main:
            what = "plain L1"
            if edge:
                w = args.edge_weight
                what = "edge-weighted L1" if w == 1 else f"{w:g} x edge-weighted L1 + {1 - w:g} x L1"
            if gan:
                what += f" + {args.gan_weight:g} x the {args.gan} discriminator's adversarial loss"
            log.info("step %d: the loss is now %s (--l1-warmup / --gan-start); its values are on another scale than "
                     "the lines above, not a divergence.", step + 1, what)
        self.loss_form = form

    def _record(self, done: int, names: list[str], vec: torch.Tensor, lr_now: float, batch_size: int) -> None:
        """The step's metrics record and progress bar; every --log-every steps a log line and a throughput record."""
        run, args, dist = self.run, self.run.args, self.run.dist
        self.seen += batch_size * dist.world_size
        record = {"kind": "train", "step": done, **{n: float(v) for n, v in zip(names, vec[:-2].tolist())}, "lr": lr_now}
        elapsed = time.time() - self.t_loop
        record["img_per_s"] = self.seen / max(elapsed, 1e-9)
        record["elapsed_s"] = time.time() - run.t_start
        record["threads"] = torch.get_num_threads()
        self.metrics.write(record)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}", refresh=False)
            self.progress.update(1)
        if dist.is_main and args.log_every > 0 and done % args.log_every == 0:
            n_img = batch_size * min(args.log_every, done - self.start)
            loader_rate, model_rate = n_img / max(self.data_s, 1e-9), n_img / max(self.compute_s, 1e-9)
            now = time.time()
            steps_per_s = (done - self.done_log) / max(now - self.t_log, 1e-9)
            self.t_log, self.done_log = now, done
            log.info("step %d/%d  loss %.5f  lr %.2e  %.2f steps/s  %.1f img/s  %d thread%s  (loader %.1f img/s against "
                     "the model's %.1f img/s: %s)", done, args.steps, record["loss"], record["lr"], steps_per_s,
                     steps_per_s * batch_size * dist.world_size, record["threads"], "s" if record["threads"] > 1 else "",
                     loader_rate, model_rate, "the loader keeps up" if loader_rate >= model_rate else "the model waits for data")
            self.metrics.write({"kind": "throughput", "step": done, "loader_img_per_s": loader_rate,
                                "model_img_per_s": model_rate, "steps_per_s": steps_per_s})
            self.data_s = self.compute_s = 0.0

    def _keep_if_best(self, done: int, val: dict) -> bool:
        if self.best is not None and val["psnr"] <= self.best["psnr"]:
            return False
        model = self.run.ema.model if self.run.ema else self.run.model
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        self.best = {"step": done, "psnr": val["psnr"], "val": dict(val), "weights": weights}
        return True

    def _best_state(self) -> dict | None:
        if self.best is None:
            return None
        return {**self.best, "start_val": self.start_val}

    def _validate_and_save(self, done: int, last: bool) -> None:
        """Validate every --val-every steps and at the end (rank 0); checkpoint every --save-every steps and at the end."""
        run, args = self.run, self.run.args
        if run.dist.is_main and run.val_pairs and ((args.val_every > 0 and done % args.val_every == 0) or last):
            self.last_val = val = validate(run)
            best = self._keep_if_best(done, val)
            self.metrics.write({"kind": "val", "step": done, **{k: v for k, v in val.items() if k != "n"},
                                "gain_db": val["psnr"] - val["bicubic_psnr"], "best": best})
            vs_start = f", {val['psnr'] - self.start_val['psnr']:+.3f} dB vs the start" if self.start_val else ""
            log.info("step %d: held-out Y-PSNR %.3f dB (bicubic %.3f, %+.3f dB%s), SSIM %.4f (bicubic %.4f)%s%s", done,
                     val["psnr"], val["bicubic_psnr"], val["psnr"] - val["bicubic_psnr"], vs_start, val["ssim"],
                     val["bicubic_ssim"], _per_spec(val), "  <- best so far" if best else "")
        if (args.save_every > 0 and done % args.save_every == 0) or last:
            save_run(run, self.out, done, self._best_state())

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


def _per_spec(val: dict) -> str:
    return "".join(f", {k[5:-1]} {v:.3f}" for k, v in val.items() if k.startswith("psnr["))
