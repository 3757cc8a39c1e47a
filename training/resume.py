"""A run's state as a checkpoint, and back: what ``checkpoint.pt`` holds (weights, optimizers, schedule, scaler,
every rank's RNG state, wall time) and how ``--resume`` puts it back into a run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from . import distributed as D
from .checkpoint import resumable_checkpoint, rng_state, save_checkpoint, set_rng_state, truncate_jsonl

if TYPE_CHECKING:
    from .run import Run
    from .runlog import MetricsLog

log = logging.getLogger("flexsr")

CHECKPOINT_NAME = "checkpoint.pt"


def checkpoint_state(run: Run, step: int, rng_states: list, best: dict | None = None) -> dict:
    state = {
        "step": step,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng_states,
        "data": {"seed": run.args.seed, "next_step": step, "world_size": run.dist.world_size},
        "args": _plain_args(run.args),
        "arch": {"name": run.loaded.architecture, "scale": run.loaded.scale},
        "wall_s": run.wall_seconds(),
    }
    if run.ema is not None:
        state["ema"] = run.ema.model.state_dict()
    if best is not None:  # the best validated weights so far and the starting model's score (plain data)
        state["best"] = best
    if run.disc is not None:
        state["disc"] = run.disc.state_dict()
        state["d_optimizer"] = run.d_optimizer.state_dict()
    return state


def _plain_args(args) -> dict:
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, (list, tuple)):
            v = [str(x) if isinstance(x, Path) else x for x in v]
        out[k] = v
    return out


_SAMPLING_ARGS = ("seed", "batch_size", "patch_size", "scale", "arch", "pretrained", "steps", "edge_weight", "l1_warmup", "gan",
                  "distill", "distill_batch", "distill_weight")


def restore(run: Run, state: dict) -> int:
    saved = state.get("args", {})
    for k in _SAMPLING_ARGS:
        if k in saved and saved[k] != getattr(run.args, k, None):
            log.warning("Resuming with --%s %s, but the checkpoint was made with %s: the run will not match an "
                        "uninterrupted one.", k.replace("_", "-"), getattr(run.args, k, None), saved[k])
    try:
        run.model.load_state_dict(state["model"])
    except RuntimeError as e:
        from archs.errors import IncompatibleWeightsError

        first = " ".join(str(e).split())[:160]
        raise IncompatibleWeightsError(
            f"the checkpoint holds another model than this run builds ({state.get('arch', {}).get('name', '?')} x"
            f"{state.get('arch', {}).get('scale', '?')} against {run.loaded.architecture} x{run.loaded.scale}): "
            f"{first}...; resume it with its own arguments (--resume RUN alone) or start afresh with --overwrite"
        ) from None
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None and "ema" in state:
        run.ema.model.load_state_dict(state["ema"])
    if run.disc is not None and "disc" in state:
        run.disc.load_state_dict(state["disc"])
        run.d_optimizer.load_state_dict(state["d_optimizer"])
    run.wall_before = float(state.get("wall_s", 0.0))
    rngs = state["rng"]
    if len(rngs) == run.dist.world_size:
        set_rng_state(rngs[run.dist.rank])
    else:
        log.warning("Checkpoint was written by %d processes, this run has %d: RNG states not restored.", len(rngs), run.dist.world_size)
        if rngs:
            set_rng_state(rngs[0])
    return int(state["step"])


def resume_or_start(run: Run, metrics: MetricsLog, out: Path) -> tuple[int, dict | None]:
    """The step the run starts at and the best validation it had: with --resume, those of the checkpoint (its
    state put back into ``run``, the metrics file cut back to its step); otherwise 0 and None, with a fresh
    metrics file. A --resume that finds no checkpoint yet starts at 0 and drops the metrics of the killed
    attempt."""
    args, dist = run.args, run.dist
    start, best = 0, None
    ckpt_path = out / CHECKPOINT_NAME
    if args.resume:
        path = ckpt_path if args.resume == "auto" else Path(args.resume)
        found = resumable_checkpoint(path, map_location=dist.device)  # falls back to checkpoint.prev.pt
        if found is not None:
            state, path = found
            start = restore(run, state)
            best = state.get("best")
            if dist.is_main:
                kept = truncate_jsonl(metrics.path, start)
                log.info("Resumed from %s at step %d (%d metric records kept).", path, start, kept)
        elif args.resume != "auto":
            raise FileNotFoundError(f"--resume {path}: no such checkpoint.")
        else:
            log.info("--resume: no checkpoint in %s yet; starting from step 0.", out)
            if dist.is_main and metrics.path.exists():
                metrics.path.unlink()  # records of an attempt killed before its first checkpoint
    elif dist.is_main and metrics.path.exists():
        metrics.path.unlink()  # a fresh run starts a fresh log
    return start, best


def save_run(run: Run, out: Path, step: int, best: dict | None = None) -> None:
    """Write ``out/checkpoint.pt`` after ``step`` steps (rank 0), with every rank's RNG state."""
    rngs = D.gather_objects(rng_state(), run.dist)
    if run.dist.is_main:
        save_checkpoint(out / CHECKPOINT_NAME, checkpoint_state(run, step, rngs, best))
