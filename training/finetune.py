"""FlexSR fine-tuning command line.

    python training/finetune.py                      # the embedded default (see --help)
    python training/finetune.py --arch FlexNet --scale 2 --data photos/ --val val/ --steps 20000
    python training/finetune.py --pretrained 4x_model.safetensors --scale 2 --freeze-body-steps 500 --data art/
    torchrun --nproc_per_node 2 training/finetune.py --arch FlexNet --data art/ ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the pack root replaces training/ on sys.path
    _here = os.path.dirname(os.path.abspath(__file__))
    _root = os.path.dirname(_here)
    if sys.path and sys.path[0] and os.path.realpath(sys.path[0]) == os.path.realpath(_here):
        sys.path[0] = _root
    elif _root not in sys.path:
        sys.path.insert(0, _root)

from archs.errors import FlexSRError  # noqa: E402
from training.degradations import DEFAULT_DOWNSCALE, DOWNSCALE_MODES, parse_lr_spec  # noqa: E402
from training.discriminators import KINDS as GAN_KINDS  # noqa: E402
from training.losses import GAN_LOSSES  # noqa: E402

log = logging.getLogger("flexsr")

#: The small FlexNet the pack ships (models/FlexSR_default_x2.safetensors) and the no-argument run trains.
DEFAULT_NAME = "FlexSR_default_x2"
DEFAULT_ARCH = "FlexNet"
DEFAULT_ARCH_ARGS = {"dim": 16, "num_blocks": [2, 2], "window_size": 8, "hidden_rate": 2, "upsampler": "ps"}
#: What ``python training/finetune.py`` with no arguments runs (a few minutes on 2 CPU cores).
DEFAULT_ARGS = [
    "--arch", DEFAULT_ARCH, "--arch-args", json.dumps(DEFAULT_ARCH_ARGS, separators=(",", ":")),
    "--scale", "2", "--name", DEFAULT_NAME, "--seed", "0", "--threads", "1",
    "--steps", "800", "--time-budget", "3", "--batch-size", "8", "--patch-size", "64",
    "--lr", "2e-3", "--lr-warmup", "30", "--ema", "0.99", "--val-every", "200", "--save-every", "100",
    "--log-every", "50", "--edge-weight", "1",
]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python training/finetune.py",
        description=(
            "Fine-tune or train a FlexSR / spandrel super-resolution model. With no arguments (precisely: without "
            "--arch, --pretrained and --data) it runs the embedded default: a small FlexNet trained for a few minutes "
            "on generated anime-style images, reporting held-out PSNR against bicubic and writing the model "
            "(.safetensors) and a side-by-side PNG under runs/. "
            "For several processes or machines run it under torchrun (DDP; NCCL on GPUs, gloo on CPU; only rank 0 "
            "writes files)."
        ),
        formatter_class=_HelpFormatter,
        epilog=_epilog(),
    )
    m = ap.add_argument_group("model")
    m.add_argument("--arch", help="a preset of the pack (see the list below), built with random weights; "
                   f"default when neither --arch nor --pretrained is given: {DEFAULT_ARCH} with the default-model "
                   "--arch-args")
    m.add_argument("--arch-args", type=_json_dict, default=None, metavar="JSON",
                   help="keyword overrides for the --arch preset, e.g. '{\"dim\": 32, \"num_blocks\": [2, 2]}'")
    m.add_argument("--pretrained", metavar="FILE", help="start from a checkpoint (anything archs.load_model reads: "
                   "FlexSR's families and spandrel's built-ins; .pth/.pt/.ckpt/.safetensors)")
    m.add_argument("--scale", type=int, default=None, help="upscale factor; default 2 for --arch, the checkpoint's "
                   "for --pretrained. A --pretrained model at another scale is rebuilt at this one: weights that "
                   "still fit are kept (the body), the rest (the tail) is re-initialized")
    m.add_argument("--init", choices=("auto", "bilinear", "random"), default="auto",
                   help="start of an --arch model: bilinear = FlexNet's pixel-shuffle tail begins as bilinear "
                   "upsampling (a residual is learned from step 0); auto = bilinear where the model allows it")
    m.add_argument("--norm-stats", choices=("auto", "frozen", "batch"), default="auto",
                   help="batch-norm layers (EIMN has 28): frozen = keep the running statistics (eval mode; their affine "
                   "weights still train), batch = normalise with batch statistics and update them; auto = frozen with "
                   "--pretrained, batch otherwise")
    m.add_argument("--freeze-body-steps", type=int, default=0, metavar="N",
                   help="with a re-initialized tail, train only the tail for the first N steps")

    d = ap.add_argument_group("data")
    d.add_argument("--data", nargs="+", metavar="DIR", help="folders of HR training images (png, jpg, webp; "
                   "searched recursively). Default: generated anime-style images (training/synthetic.py)")
    d.add_argument("--val", metavar="DIR", help="folder of HR validation images (LR made by antialiased bicubic). "
                   "Default without --data: a generated held-out set; with --data: no validation")
    d.add_argument("--val-every", type=int, default=500, metavar="N", help="validate every N steps (and at the end)")
    d.add_argument("--val-crop", type=int, default=0, metavar="PX", help="validate on a centred PX square of each "
                   "image (0 = whole images)")
    d.add_argument("--val-max-images", type=int, default=0, metavar="N", help="use the first N validation images (0 = all)")
    d.add_argument("--val-lr", nargs="+", default=None, metavar="SPEC", help="how validation LR images are made, one "
                   "pair per image and SPEC, the score their mean: <downscale>[+jpeg<Q>], e.g. matlab matlab+jpeg75 "
                   "(8-bit LR; default: antialiased bicubic)")
    d.add_argument("--patch-size", type=int, default=128, metavar="PX", help="HR patch side (a multiple of the scale)")
    d.add_argument("--batch-size", type=int, default=16, metavar="N", help="patches per step and process (under "
                   "torchrun each of the processes draws N patches of its own)")
    d.add_argument("--degradation", choices=("classic", "real"), default="classic",
                   help="classic = --downscale/--blur/--noise/--jpeg as given; real = the real-world pipeline of "
                   "training/degradations.py (two rounds of editor downscalers, blur, noise and JPEG q 30-95 at 4:2:0, "
                   "drawn per patch; --clean-prob of the patches get MATLAB bicubic only)")
    d.add_argument("--clean-prob", type=float, default=0.15, metavar="P", help="--degradation real: share of clean "
                   "(bicubic-only) patches")
    d.add_argument("--downscale", nargs="+", choices=DOWNSCALE_MODES, default=list(DEFAULT_DOWNSCALE),
                   help="LR downscale modes; one is drawn per batch (bicubic is antialiased; matlab = MATLAB imresize; "
                   "pil-bicubic, lanczos, box, pil-bilinear = pillow's filters)")
    d.add_argument("--blur", type=float, default=0.0, metavar="SIGMA", help="max Gaussian blur sigma of HR before "
                   "downscaling (0 = off)")
    d.add_argument("--blur-prob", type=float, default=0.5, metavar="P", help="chance an image gets blurred")
    d.add_argument("--noise", type=float, default=0.0, metavar="LEVEL", help="max Gaussian noise std on LR, in 8-bit "
                   "levels (0 = off)")
    d.add_argument("--noise-prob", type=float, default=0.5, metavar="P", help="chance an image gets noise")
    d.add_argument("--jpeg", type=int, default=0, metavar="Q", help="lowest JPEG quality of LR artefacts, drawn in "
                   "[Q, 95] (0 = off; pillow's encoder)")
    d.add_argument("--jpeg-prob", type=float, default=0.5, metavar="P", help="chance an image gets JPEG-compressed")
    d.add_argument("--small-images", choices=("pad", "skip"), default="pad",
                   help="images smaller than the patch: mirror-pad them or skip them")
    d.add_argument("--no-augment", action="store_true", help="no random flips / 90-degree rotations")
    d.add_argument("--workers", type=int, default=None, metavar="N", help="DataLoader worker processes (default: 4 on CUDA, 0 on CPU)")
    d.add_argument("--cache-mb", type=int, default=1024, metavar="MIB", help="decoded-image cache per process, in MiB")
    d.add_argument("--synthetic-count", type=int, default=64, metavar="N", help="generated training images (no --data)")
    d.add_argument("--synthetic-size", type=int, default=160, metavar="PX", help="side of generated training images")
    d.add_argument("--synthetic-val-count", type=int, default=8, metavar="N", help="generated held-out images (no --data)")
    d.add_argument("--synthetic-val-size", type=int, default=128, metavar="PX", help="side of generated held-out images")

    lo = ap.add_argument_group("loss")
    lo.add_argument("--edge-weight", type=float, default=0.0, metavar="W", help="after the warm-up the pixel loss is "
                    "W * edge-weighted L1 + (1 - W) * L1 (edge weights: Sobel magnitude of the HR patch); 0 = plain L1, "
                    "what the shipped fine-tunes measured best (models/README.md); the embedded default run uses 1")
    lo.add_argument("--l1-warmup", type=int, default=None, metavar="N", help="plain-L1 steps before the edge-weighted "
                    "loss (and the GAN) start (default: half of --steps)")
    lo.add_argument("--distill", metavar="FILE", help="keep this frozen model's behaviour on clean input (e.g. the "
                    "published checkpoint a real-world fine-tune starts from): every batch gets --distill-batch more "
                    "patches with clean MATLAB-bicubic LR, scored by L1 against FILE's output on them instead of the HR")
    lo.add_argument("--distill-batch", type=int, default=4, metavar="N", help="--distill: clean patches per step and "
                    "process, on top of --batch-size")
    lo.add_argument("--distill-weight", type=float, default=1.0, metavar="W", help="--distill: weight of their L1 "
                    "(the pixel loss of the batch has weight 1)")
    lo.add_argument("--gan", choices=GAN_KINDS, default=None, help="add an adversarial loss with this discriminator "
                    "(vit/cait/crossformer/crossvit from archs; patch = conv PatchGAN)")
    lo.add_argument("--gan-args", type=_json_dict, default=None, metavar="JSON", help="keyword overrides for the "
                    "discriminator, e.g. '{\"dim\": 128, \"depth\": 4}'")
    lo.add_argument("--gan-loss", choices=GAN_LOSSES, default="hinge", help="hinge or non-saturating (softplus) loss")
    lo.add_argument("--gan-weight", type=float, default=0.005, metavar="W", help="weight of the generator's adversarial loss")
    lo.add_argument("--gan-lr", type=float, default=1e-4, metavar="LR", help="discriminator learning rate (its own AdamW)")
    lo.add_argument("--gan-start", type=int, default=None, metavar="N", help="first GAN step (default: end of --l1-warmup)")
    lo.add_argument("--gan-spectral-norm", action="store_true", help="spectral normalisation in ViT-family discriminators "
                    "(the patch discriminator always has it)")

    t = ap.add_argument_group("optimisation")
    t.add_argument("--steps", type=int, default=10000, metavar="N", help="optimizer steps")
    t.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate")
    t.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.99), metavar=("B1", "B2"), help="AdamW betas")
    t.add_argument("--weight-decay", type=float, default=0.0, metavar="WD", help="AdamW weight decay")
    t.add_argument("--lr-warmup", type=int, default=None, metavar="N", help="linear LR warm-up steps (default: 5%% "
                   "of --steps, at most 100); a --time-budget run warms up over the same share of its shortened schedule")
    t.add_argument("--schedule", choices=("cosine", "multistep", "constant"), default="cosine", help="LR after the warm-up")
    t.add_argument("--min-lr", type=float, default=1e-6, metavar="LR", help="cosine floor")
    t.add_argument("--milestones", type=int, nargs="*", default=None, metavar="STEP", help="multistep: steps where the LR "
                   "is multiplied by --gamma (default: 50%%, 75%%, 90%% of --steps)")
    t.add_argument("--gamma", type=float, default=0.5, help="multistep factor")
    t.add_argument("--clip-grad", type=float, default=1.0, metavar="NORM", help="gradient-norm clipping (0 = off)")
    t.add_argument("--ema", type=float, default=0.999, metavar="DECAY", help="EMA of the weights, used for validation "
                   "and export (0 = off)")
    t.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="mixed precision: auto = bf16 (fp16 where bf16 is unsupported) on CUDA, none on CPU")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: each rank's local GPU)")
    t.add_argument("--threads", type=int, default=0, metavar="N", help="torch CPU threads; 0 = measured: the run "
                   "times 1 thread against all cores over a few steps, keeps the faster and measures again every 10 "
                   "minutes (on a busy machine one thread is often several times faster); give N for bit-exact reruns")
    t.add_argument("--seed", type=int, default=0, metavar="N", help="seeds the weights and the data: batch k is a pure function of "
                   "(seed, k, rank)")

    o = ap.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="everything a run writes: checkpoint.pt, metrics.jsonl, train.log, "
                   "tensorboard/, <name>.safetensors, <name>_samples.png, summary.json (default: runs/<name>)")
    o.add_argument("--name", help="name of the exported model, a plain file name (default: <arch>_x<scale> when "
                   "--scale is given, else <arch>; with --pretrained the file's stem in place of <arch>; the "
                   f"embedded default run: {DEFAULT_NAME})")
    o.add_argument("--export", choices=("best", "last"), default="best", help="which weights the exported "
                   ".safetensors holds: the best validated ones (the starting model included) or the last ones; "
                   "summary.json and the log give both scores")
    o.add_argument("--overwrite", action="store_true", help="start afresh in a non-empty --out, replacing the "
                   "previous run's checkpoint, log, metrics and model (without it a non-empty --out needs --resume)")
    o.add_argument("--save-every", type=int, default=500, metavar="N", help="write checkpoint.pt every N steps "
                   "(atomically) and at the end")
    o.add_argument("--resume", nargs="?", const="auto", default=None, metavar="RUN", help="continue a run: RUN is "
                   "its folder or checkpoint (default: --out's checkpoint.pt; starts fresh if there is none). The run's "
                   "own arguments come back from its checkpoint, so `--resume runs/x` alone is enough; flags given "
                   "beside it may change only how it runs (--threads, --time-limit, --log-every, ...), not what it "
                   "trains. Same seed and settings give the same loss curve as an uninterrupted run")
    o.add_argument("--time-budget", type=float, default=0.0, metavar="MIN", help="fit the whole schedule (L1 warm-up, "
                   "GAN start, LR decay) into MIN minutes of training steps (validation and checkpoints come on top): a "
                   "machine too slow for --steps in that time advances the schedule by time and does fewer steps; a fast "
                   "enough one runs exactly the step-based schedule (0 = steps only)")
    o.add_argument("--time-limit", type=float, default=0.0, metavar="MIN", help="hard stop (checkpoint, export) after "
                   "MIN minutes of wall time, wherever the schedule is (0 = no limit)")
    o.add_argument("--log-every", type=int, default=100, metavar="N", help="log a line every N steps")
    o.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    o.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="also log to <out>/tensorboard when TensorBoard is installed")
    return ap


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown where they say something; the epilog keeps its line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object of keyword arguments")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}


def _epilog() -> str:
    import textwrap

    try:
        from training.models import available_presets

        presets = ", ".join(available_presets())
    except Exception as e:  # noqa: BLE001 - --help must work even with a broken family
        presets = f"(could not list: {e})"
    default = " ".join(shlex.quote(a) for a in DEFAULT_ARGS)
    wrap = lambda text: textwrap.fill(text, 100, subsequent_indent="  ")  # noqa: E731
    return "\n".join([
        wrap(f"presets for --arch: {presets}"),
        "",
        wrap(f"without --arch, --pretrained or --data, the embedded default run applies: python training/finetune.py "
             f"{default} (options given on top override it, e.g. --out DIR or --steps N)"),
        "",
        "examples:",
        "  python training/finetune.py --arch FlexNet --scale 4 --data imgs/ --val val/ --steps 50000",
        "  python training/finetune.py --pretrained 4x_model.pth --scale 2 --freeze-body-steps 1000 --data imgs/",
        "  python training/finetune.py --resume runs/a                  # continue a stopped run (Ctrl-C saves)",
        "  torchrun --nproc_per_node 4 training/finetune.py --arch FlexNet --data imgs/ --batch-size 8",
        "  torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 \\",
        "      training/finetune.py --arch FlexNet --data imgs/            # (node_rank 1 on the other machine)",
    ])


class _TqdmHandler(logging.Handler):
    """Console log lines that do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


def _setup_console_logging() -> None:
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        h = _TqdmHandler()
        h.setFormatter(logging.Formatter("[flexsr] %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO)


def uses_default_run(argv: list[str]) -> bool:
    """Without --arch, --pretrained or --data a run is the embedded default (options given override it)."""
    return not any(a.split("=", 1)[0] in ("--arch", "--pretrained", "--data") for a in argv)


#: Flags that change only how a run runs, not what it trains: they may differ on --resume.
RUNTIME_FLAGS = {"threads", "workers", "device", "time_limit", "log_every", "no_progress", "tensorboard", "resume",
                 "out", "save_every", "val_every", "cache_mb", "export"}
#: Flags that may change on --resume to lengthen or shorten a run (its schedule is stretched: said in the log).
EXTENDING_FLAGS = {"steps", "time_budget"}


class ResumeArgsError(ValueError):
    """--resume was given arguments that conflict with the run's own."""


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options that appear in ``argv`` (``--flag`` or ``--flag=value``)."""
    found = set()
    for action in parser._actions:  # noqa: SLF001 - argparse has no public way to ask this
        for opt in action.option_strings:
            if any(tok == opt or tok.startswith(opt + "=") for tok in argv):
                found.add(action.dest)
    return found


def resume_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str] | None:
    """With --resume, the argument list the run was started with, plus the runtime flags given now; None when
    there is nothing to resume (no --resume, or no checkpoint yet)."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--resume", nargs="?", const="auto", default=None)
    probe.add_argument("--out")
    known, _ = probe.parse_known_args(argv)
    if known.resume is None:
        return None
    from training.checkpoint import load_checkpoint, previous_path

    if known.resume != "auto":
        target = Path(known.resume)
        ckpt = target / "checkpoint.pt" if target.is_dir() else target
    elif known.out:
        ckpt = Path(known.out) / "checkpoint.pt"
    else:
        return None
    candidates = [c for c in (ckpt, previous_path(ckpt)) if c.is_file()]
    saved = None
    for cand in candidates:
        try:
            saved = load_checkpoint(cand).get("args", {})
            break
        except Exception:  # noqa: BLE001 - a damaged file: the previous one, or the run reports it later
            continue
    if not saved or not saved.get("command"):
        return None
    old_argv = list(saved["command"][2:])
    given = given_flags(parser, argv)
    now = parser.parse_args(_with_default(argv))
    then = parser.parse_args(_with_default(old_argv))
    conflicts = [d for d in sorted(given - RUNTIME_FLAGS - EXTENDING_FLAGS) if getattr(now, d) != getattr(then, d)]
    if conflicts:
        parts = [f"--{d.replace('_', '-')} {getattr(now, d)!r} (the run has {getattr(then, d)!r})" for d in conflicts]
        raise ResumeArgsError(f"--resume {ckpt.parent}: {'; '.join(parts)}: a resumed run keeps its own settings; drop "
                              f"{'it' if len(parts) == 1 else 'them'}, or start afresh with --overwrite or another --out")
    keep = [tok for tok in old_argv]
    runtime = [d for d in given & (RUNTIME_FLAGS | EXTENDING_FLAGS) if d not in ("resume", "out")]
    for d in sorted(given & EXTENDING_FLAGS):
        if getattr(now, d) != getattr(then, d):
            print(f"note: --resume with --{d.replace('_', '-')} {getattr(now, d)} (the run had {getattr(then, d)}): "
                  f"its schedule is stretched to it; the result will differ from a run started that way",
                  file=sys.stderr)
    extra = []
    for action in parser._actions:  # noqa: SLF001
        if action.dest in runtime:
            for i, tok in enumerate(argv):
                if tok in action.option_strings or any(tok.startswith(o + "=") for o in action.option_strings):
                    end = i + 1
                    while end < len(argv) and not argv[end].startswith("--"):
                        end += 1
                    extra += argv[i:end]
    resume_flag = ["--resume", str(ckpt)] if known.resume != "auto" else ["--resume"]
    out_flag = ["--out", str(ckpt.parent)]
    return [*_strip(keep, ("--resume", "--out", "--overwrite")), *extra, *out_flag, *resume_flag]


def _with_default(argv: list[str]) -> list[str]:
    return [*DEFAULT_ARGS, *argv] if uses_default_run(argv) else list(argv)


def _strip(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` without the given flags and their values."""
    out, skip = [], False
    for tok in argv:
        if skip and not tok.startswith("--"):
            continue
        skip = False
        if tok in flags or any(tok.startswith(f + "=") for f in flags):
            skip = "=" not in tok
            continue
        out.append(tok)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        resumed = resume_argv(parser, argv)
    except ResumeArgsError as e:
        parser.error(str(e))
    if resumed is not None:
        argv = resumed
    if uses_default_run(argv):
        argv = [*DEFAULT_ARGS, *argv]  # the embedded default, with whatever was given on top
    args = parser.parse_args(argv)
    args.resumed_from_checkpoint_args = resumed is not None
    if args.arch and args.pretrained:
        parser.error("give --arch or --pretrained, not both")
    if not args.arch and not args.pretrained:
        args.arch = DEFAULT_ARCH
        if args.arch_args is None:
            args.arch_args = _json_dict(json.dumps(DEFAULT_ARCH_ARGS))
    if args.name is None:  # never the name of the file it starts from (a shipped model's, say)
        if args.arch:
            args.name = f"{args.arch}_x{args.scale}" if args.scale else args.arch
        else:
            stem = Path(args.pretrained).stem
            args.name = f"{stem}_x{args.scale}_ft" if args.scale else f"{stem}_ft"
    if args.lr_warmup is None:
        args.lr_warmup = max(1, min(100, round(0.05 * args.steps)))
    if args.out is None:
        args.out = str(Path("runs") / args.name)
    if args.workers is None:
        import torch

        args.workers = 4 if torch.cuda.is_available() and args.device != "cpu" else 0
    if args.milestones is None:
        args.milestones = [int(args.steps * f) for f in (0.5, 0.75, 0.9)]
    validate_args(parser, args)
    args.command = ["python", "training/finetune.py", *argv]
    return args


#: Device names Windows reserves (a run's files are often copied there).
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in range(10))}
_PLAIN_NAME = re.compile(r"[\w\-+()\[\],. ]+")


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag checked before anything runs: a bad value is argparse's ``error:`` line and exit code 2."""
    import math

    def fail(flag: str, value, why: str) -> None:
        parser.error(f"argument {flag}: invalid value {value!r}: {why}")

    for name, value in vars(args).items():  # NaN / inf slip through argparse's float()
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                fail("--" + name.replace("_", "-"), v, "must be a finite number")

    at_least = {
        "steps": 1, "batch_size": 1, "patch_size": 4, "val_every": 0, "save_every": 0, "log_every": 0,
        "threads": 0, "workers": 0, "cache_mb": 0, "val_crop": 0, "val_max_images": 0, "freeze_body_steps": 0,
        "lr_warmup": 0, "synthetic_count": 1, "synthetic_val_count": 1, "synthetic_size": 8, "synthetic_val_size": 8,
        "seed": 0, "jpeg": 0, "blur": 0.0, "noise": 0.0, "weight_decay": 0.0, "clip_grad": 0.0, "min_lr": 0.0,
        "gan_weight": 0.0, "time_budget": 0.0, "time_limit": 0.0, "distill_batch": 1, "distill_weight": 0.0,
    }
    for name, low in at_least.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            fail("--" + name.replace("_", "-"), value, f"must be at least {low}")
    for name in ("l1_warmup", "gan_start"):  # None = the default; a negative value means the same
        value = getattr(args, name, None)
        if value is not None and value < -1:
            fail("--" + name.replace("_", "-"), value, "must be at least 0")
    positive = ("lr", "gan_lr", "gamma")
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            fail("--" + name.replace("_", "-"), value, "must be greater than 0")
    for spec in args.val_lr or []:
        try:
            parse_lr_spec(spec)
        except ValueError as e:
            fail("--val-lr", spec, str(e).split(": ", 1)[-1])
    if args.degradation == "real":
        given = [f for f, v, d in (("--blur", args.blur, 0.0), ("--noise", args.noise, 0.0), ("--jpeg", args.jpeg, 0),
                                   ("--downscale", list(args.downscale), list(DEFAULT_DOWNSCALE))) if v != d]
        if given:
            parser.error(f"argument --degradation: 'real' draws its own downscalers, blur, noise and JPEG; drop {', '.join(given)}")
    for name in ("blur_prob", "noise_prob", "jpeg_prob", "edge_weight", "clean_prob"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value <= 1:
            fail("--" + name.replace("_", "-"), value, "must be between 0 and 1")
    if not 0 <= args.ema < 1:
        fail("--ema", args.ema, "the EMA decay must be in [0, 1) (0 = off)")
    if any(not 0 <= b < 1 for b in args.betas):
        fail("--betas", list(args.betas), "AdamW betas must be in [0, 1)")
    if args.jpeg and not 1 <= args.jpeg <= 95:
        fail("--jpeg", args.jpeg, "the lowest JPEG quality must be 1..95 (0 = off)")
    if args.scale is not None and not 1 <= args.scale <= 16:
        fail("--scale", args.scale, "the upscale factor must be 1..16")
    if args.scale is not None and args.patch_size % args.scale:
        fail("--patch-size", args.patch_size, f"must be a multiple of --scale {args.scale} (--patch-size defaults to "
             f"128: give one that is, e.g. {max(args.scale, args.patch_size // args.scale * args.scale)})")
    if any(m < 0 for m in args.milestones):
        fail("--milestones", args.milestones, "steps must be at least 0")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?", str(args.device)):
        fail("--device", args.device, "use auto, cpu, cuda or cuda:N")

    name = args.name
    if (not _PLAIN_NAME.fullmatch(name) or ".." in name or name.startswith(".") or name != name.strip()
            or name.split(".")[0].rstrip(" ").upper() in _RESERVED or len(name.encode()) > 200):
        fail("--name", name, "must be a plain file name (letters, digits, spaces, - _ + ( ) [ ] , .; no path "
             "separators, no '..', not a reserved device name such as CON or NUL, at most 200 bytes)")

    for flag, value in (("--pretrained", args.pretrained), ("--distill", args.distill)):
        if value and not Path(value).is_file():
            fail(flag, value, "no such file")
    for flag, folders in (("--data", args.data or []), ("--val", [args.val] if args.val else [])):
        for folder in folders:
            if Path(folder).is_file():
                fail(flag, folder, "is a file; give the folder that holds the images")
            if not Path(folder).is_dir():
                fail(flag, folder, "no such folder")
    if args.resume not in (None, "auto") and not Path(args.resume).exists():
        from training.checkpoint import previous_path

        if not previous_path(args.resume).exists():
            fail("--resume", args.resume, "no such checkpoint")

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        fail("--out", args.out, "exists and is not a folder")
    if args.resume and args.overwrite:
        parser.error("give --resume or --overwrite, not both")


def check_out_folder(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A run must not silently replace another: a non-empty --out needs --resume or --overwrite.

    Checked when a run starts (``main``), not by ``parse_args``, which tools also call to read defaults.
    """
    out = Path(args.out)
    first_rank = os.environ.get("RANK", "0") == "0"  # under torchrun rank 0 decides (the others start later)
    if first_rank and out.is_dir() and any(out.iterdir()) and not args.resume and not args.overwrite:
        parser.error(f"argument --out: invalid value {args.out!r}: the folder is not empty (a previous run?); pass "
                     f"--resume to continue it or --overwrite to replace it")


def resume_command(out: str | Path) -> str:
    return f"python training/finetune.py --resume {shlex.quote(str(out))}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_out_folder(build_parser(), args)
    _setup_console_logging()
    if uses_default_run(list(sys.argv[1:] if argv is None else argv)) and not args.resumed_from_checkpoint_args:
        log.info("The embedded default run: %s", " ".join(shlex.quote(a) for a in args.command))
    if args.resumed_from_checkpoint_args:
        log.info("--resume: the run's own arguments: %s", " ".join(shlex.quote(a) for a in args.command[2:]))
    from archs.errors import DiskFullError
    from training.loop import TrainingInterrupted, train
    from training.runlog import RunLockedError

    if args.overwrite and os.environ.get("RANK", "0") == "0":
        from training.checkpoint import clear_previous_run

        for p in clear_previous_run(args.out):
            log.info("--overwrite: removed the previous run's %s", p.name)
    try:
        summary = train(args)
    except TrainingInterrupted as e:
        print(f"{e}\nTo continue: {resume_command(args.out)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        ckpt = Path(args.out) / "checkpoint.pt"
        where = (f"the last checkpoint in {args.out} stays; to continue: {resume_command(args.out)}" if ckpt.exists()
                 else "no checkpoint was written yet; run the command again to start over")
        print(f"Interrupted: {where}", file=sys.stderr)
        return 130
    except DiskFullError as e:
        print(f"error: {e} The previous checkpoint is intact; to continue: {resume_command(args.out)}", file=sys.stderr)
        return 1
    except (RunLockedError, FlexSRError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary:
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
