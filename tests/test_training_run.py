"""End-to-end fine-tuning runs, kept tiny: every architecture family archs offers, export -> loader round
trip, re-scaling a pretrained model, the GAN path, data folders, resume after SIGKILL, DDP on 2 CPU processes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import archs
from training import finetune
from training.checkpoint import load_checkpoint, read_jsonl
from training.models import available_presets, build_preset

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]

#: Tiny configurations by --arch name, one or more per family (families land over time; absent ones skip).
TINY = {
    "FlexNet": {"dim": 8, "num_blocks": [1], "window_size": 4, "hidden_rate": 1},
    "LMLT": {"dim": 8, "n_blocks": 1},  # window_size is not in the weights: the loader assumes 8
    "LAMNet": {"num_blocks": 1, "num_groups": 1, "dim": 8, "num_head": 2},
    "EIMN": {"embed_dims": 8, "num_stages": 1},
    "SR": {"num_blocks": 1, "dim": 8, "window_size": 4, "num_heads": 2},
    "TransformerSR": {"num_blocks": 1, "dim": 8, "window_size": 4, "num_heads": 2},
    "Compact": {"num_feat": 8, "num_conv": 2},  # spandrel's, always there
}

TINY_RUN = [
    "--steps", "2", "--batch-size", "2", "--patch-size", "16", "--lr-warmup", "1",
    "--synthetic-count", "2", "--synthetic-size", "24", "--synthetic-val-count", "1", "--synthetic-val-size", "16",
    "--val-every", "0", "--save-every", "0", "--threads", "1", "--no-progress", "--no-tensorboard",
]


def tiny_args(arch: str, out: Path, *extra: str) -> list[str]:
    return ["--arch", arch, "--arch-args", json.dumps(TINY[arch]), *TINY_RUN, "--out", str(out), *extra]


def run_inline(argv: list[str]) -> dict:
    rc = finetune.main(argv)
    assert rc == 0
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "summary.json").read_text())


def train_records(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]


def main_arch() -> str:
    return "FlexNet" if "FlexNet" in available_presets() else "Compact"


# --------------------------------------------------------------------------------------------------
# Every family


def test_every_family_of_archs_has_a_tiny_config():
    from archs.registry import FAMILY_MODULES

    presets = available_presets()
    for family in FAMILY_MODULES:
        names = [n for n, p in presets.items() if p.family == family]
        if names:  # a family module with trainable models
            assert any(n in TINY for n in names), f"archs.{family} ({', '.join(names)}) needs an entry in TINY"


@pytest.mark.parametrize("arch", sorted(TINY))
def test_tiny_run_exports_a_model_the_loader_reads(arch, tmp_path):
    if arch not in available_presets():
        pytest.skip(f"{arch} is not in this copy of archs")
    out = tmp_path / "run"
    summary = run_inline(tiny_args(arch, out, "--scale", "2"))
    records = train_records(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert summary["steps"] == 2 and summary["scale"] == 2 and np.isfinite(summary["val_psnr"])
    exported = Path(summary["model"])
    assert exported.suffix == ".safetensors" and exported.parent == out
    desc = archs.load_model(exported)  # spandrel detection through the loader node's path
    assert desc.scale == 2
    # the exported weights are the EMA weights of the last checkpoint: same outputs
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2
    ema = build_preset(arch, 2, TINY[arch])  # the trained class (the loader may convert, e.g. TransformerSR -> SR)
    ema.load_state_dict(state["ema"])
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(desc.model.eval()(x), ema.eval()(x), atol=1e-6)
    assert (out / f"{summary['model'].rsplit('/', 1)[-1][:-12]}_samples.png").is_file()


def test_unknown_arch_is_a_clear_error(tmp_path, capsys):
    rc = finetune.main(["--arch", "NoSuchNet", *TINY_RUN, "--out", str(tmp_path / "x")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Unknown --arch 'NoSuchNet'" in err and "Compact" in err


# --------------------------------------------------------------------------------------------------
# Pretrained models at another scale


@pytest.mark.parametrize("arch", ["Compact", "FlexNet"])
def test_pretrained_at_another_scale_keeps_the_body_and_reinitialises_the_tail(arch, tmp_path):
    if arch not in available_presets():
        pytest.skip(f"{arch} is not in this copy of archs")
    x2 = Path(run_inline(tiny_args(arch, tmp_path / "x2", "--scale", "2"))["model"])
    pre = archs.load_model(x2).model.state_dict()
    common = [*TINY_RUN, "--pretrained", str(x2), "--scale", "4", "--ema", "0", "--synthetic-val-size", "20"]
    run_inline([*common, "--freeze-body-steps", "2", "--out", str(tmp_path / "frozen")])
    frozen = load_checkpoint(tmp_path / "frozen" / "checkpoint.pt")["model"]
    kept = [k for k in frozen if k in pre and pre[k].shape == frozen[k].shape]
    fresh = [k for k in frozen if k not in kept]
    assert kept and fresh, "x2 -> x4 must keep the body and replace the tail"
    assert all(torch.equal(frozen[k], pre[k]) for k in kept if frozen[k].is_floating_point())
    summary = run_inline([*common, "--freeze-body-steps", "1", "--out", str(tmp_path / "thawed")])
    thawed = load_checkpoint(tmp_path / "thawed" / "checkpoint.pt")["model"]
    assert any(not torch.equal(thawed[k], pre[k]) for k in kept if thawed[k].is_floating_point())
    desc = archs.load_model(summary["model"])
    assert desc.scale == 4 and desc.model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)
    # the fine-tune records the file it started from, and how that file was made
    with safe_open(summary["model"], "pt") as f:
        meta = f.metadata()
    with safe_open(str(x2), "pt") as f:
        parent = f.metadata()
    assert meta["pretrained"] == f"{x2.name} sha256={hashlib.sha256(x2.read_bytes()).hexdigest()}"
    assert meta["pretrained_command"] == parent["command"] and meta["pretrained_seed"] == parent["seed"]


# --------------------------------------------------------------------------------------------------
# Distillation: clean anchor patches held to a frozen model


def _clean_distance(a, b) -> float:
    """Mean |a(x) - b(x)| over fixed clean inputs (the kind --distill's anchors are)."""
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x).clamp(0, 1)).abs().mean())


def test_distill_holds_clean_patches_to_the_frozen_model_and_records_it(tmp_path, capsys):
    start = Path(run_inline(tiny_args("Compact", tmp_path / "start", "--scale", "2", "--seed", "1"))["model"])
    teacher = Path(run_inline(tiny_args("Compact", tmp_path / "teacher", "--scale", "2", "--seed", "2"))["model"])
    common = [*TINY_RUN, "--pretrained", str(start), "--steps", "30", "--lr", "3e-3", "--lr-warmup", "0", "--ema", "0",
              "--jpeg", "30", "--jpeg-prob", "1", "--batch-size", "2"]
    plain = run_inline([*common, "--out", str(tmp_path / "plain")])
    held = run_inline([*common, "--distill", str(teacher), "--distill-batch", "2", "--distill-weight", "20",
                       "--out", str(tmp_path / "held")])
    records = train_records(tmp_path / "held")
    assert all(np.isfinite(r["distill_l1"]) and r["distill_l1"] > 0 for r in records)
    assert all("distill_l1" not in r for r in train_records(tmp_path / "plain"))
    t = archs.load_model(teacher).model
    d_plain = _clean_distance(archs.load_model(plain["model"]).model, t)
    d_held = _clean_distance(archs.load_model(held["model"]).model, t)
    d_start = _clean_distance(archs.load_model(start).model, t)
    assert d_held < 0.5 * d_start and d_held < 0.5 * d_plain, (d_start, d_plain, d_held)
    with safe_open(held["model"], "pt") as f:
        meta = f.metadata()
    with safe_open(str(teacher), "pt") as f:
        parent = f.metadata()
    assert meta["distill"] == f"{teacher.name} sha256={hashlib.sha256(teacher.read_bytes()).hexdigest()}"
    assert meta["distill_seed"] == parent["seed"] == "2" and "--distill-weight 20" in meta["command"]
    # a teacher of another scale cannot guide the run: an error naming it, nothing exported
    x4 = Path(run_inline(tiny_args("Compact", tmp_path / "x4", "--scale", "4"))["model"])
    capsys.readouterr()
    assert finetune.main([*common, "--distill", str(x4), "--out", str(tmp_path / "bad")]) == 2
    assert "x4 model cannot guide a x2 run" in capsys.readouterr().err
    assert not list((tmp_path / "bad").glob("*.safetensors"))
    with pytest.raises(SystemExit):
        finetune.parse_args([*common, "--distill", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "m")])


# --------------------------------------------------------------------------------------------------
# GAN, data folders


def test_patch_gan_trains_a_discriminator_with_its_own_optimizer(tmp_path):
    out = tmp_path / "gan"
    run_inline(tiny_args("Compact", out, "--gan", "patch", "--gan-loss", "nonsaturating", "--l1-warmup", "1"))
    records = train_records(out)
    assert "d_loss" not in records[0] and "g_adv" not in records[0]  # GAN starts after the L1 warm-up
    assert np.isfinite(records[1]["d_loss"]) and np.isfinite(records[1]["g_adv"])
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["disc"] and state["d_optimizer"]["state"]


def test_vit_family_gan_when_archs_has_the_discriminators(tmp_path):
    pytest.importorskip("archs.discriminator")
    out = tmp_path / "vitgan"
    run_inline(tiny_args("Compact", out, "--gan", "vit", "--l1-warmup", "0", "--gan-args",
                         json.dumps({"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32, "dim_head": 8, "patch_size": 8})))
    assert all(np.isfinite(r["d_loss"]) for r in train_records(out))


def test_folder_data_with_bad_and_small_files(tmp_path, caplog):
    data, val = tmp_path / "data", tmp_path / "val"
    rng = np.random.default_rng(0)
    for folder, n in ((data / "sub", 2), (val, 1)):
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray((rng.random((30, 28, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    Image.fromarray((rng.random((10, 12, 3)) * 255).astype(np.uint8)).save(data / "small.jpg")
    (data / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="flexsr"):
        summary = run_inline(tiny_args("Compact", out, "--data", str(data), "--val", str(val)))
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("Skipping unreadable image") for m in messages) == 1
    assert any("1 images smaller than the 16 px patch will be mirror-padded" in m for m in messages)
    assert summary["val_n"] == 1
    (tmp_path / "empty").mkdir()
    assert finetune.main(tiny_args("Compact", tmp_path / "e", "--data", str(tmp_path / "empty"))) == 2


# --------------------------------------------------------------------------------------------------
# Resume after SIGKILL, DDP


def _script(argv: list[str], env_extra: dict | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "training/finetune.py", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _curve(out: Path) -> list[tuple]:
    return [(r["kind"], r["step"], r.get("loss"), r.get("psnr")) for r in read_jsonl(out / "metrics.jsonl")]


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_loss_curve(tmp_path):
    arch = main_arch()
    base = ["--arch", arch, "--arch-args", json.dumps(TINY[arch]), *TINY_RUN, "--steps", "8", "--save-every", "2",
            "--val-every", "4", "--edge-weight", "0.5", "--l1-warmup", "3", "--noise", "5", "--jpeg", "60"]
    ref = tmp_path / "ref"
    run_inline([*base, "--out", str(ref)])

    out = tmp_path / "killed"
    proc = _script([*base, "--out", str(out)], {"FLEXSR_DEBUG_STEP_SLEEP": "0.4"})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoint.pt").exists() and len(train_records(out)) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    killed_at = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 2 <= killed_at < 8
    assert not (out / "summary.json").exists()

    resumed = _script([*base, "--out", str(out), "--resume"])
    log_text = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log_text
    assert f"Resumed from {out / 'checkpoint.pt'} at step {killed_at}" in log_text
    assert _curve(out) == _curve(ref)  # exact: every loss and validation PSNR, bit for bit
    assert json.loads((out / "summary.json").read_text())["steps"] == 8


@pytest.mark.slow
def test_ddp_two_cpu_processes_shard_the_data_and_only_rank0_writes(tmp_path):
    # A pretrained x2 model re-scaled to x4 with a frozen body and a patch GAN: every moving part under DDP.
    x2 = run_inline(tiny_args("Compact", tmp_path / "x2"))["model"]
    out = tmp_path / "ddp"
    argv = [*TINY_RUN, "--pretrained", x2, "--scale", "4", "--freeze-body-steps", "2", "--gan", "patch",
            "--l1-warmup", "1", "--synthetic-val-size", "24", "--steps", "3", "--device", "cpu", "--ema", "0",
            "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "training/finetune.py", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    records = train_records(out)
    assert [r["step"] for r in records] == [1, 2, 3]  # one writer
    assert "d_loss" not in records[0] and all(np.isfinite(r["d_loss"]) for r in records[1:])
    state = load_checkpoint(out / "checkpoint.pt")
    assert len(state["rng"]) == 2  # every rank's RNG state saved
    assert archs.load_model(summary["model"]).scale == 4

    # Step 1's logged loss is the mean of the two ranks' losses on their own (seed, step, rank) batches.
    from training.data import PatchSampler
    from training.degradations import Degradation
    from training.losses import PixelLoss
    from training.run import _seed_all, make_data, make_model

    args = finetune.parse_args(argv)
    _seed_all(args.seed)
    model = make_model(args).model
    images, _ = make_data(args, 4, is_main=False)
    sampler = PatchSampler(images, args.patch_size, args.batch_size, Degradation(scale=4), args.seed)
    with torch.no_grad():
        losses = [PixelLoss(args.edge_weight)(model(lr), hr, edge_on=False)[0] for lr, hr in (sampler.batch(0, r) for r in (0, 1))]
    assert not torch.isclose(losses[0], losses[1])
    assert records[0]["loss"] == pytest.approx(float((losses[0] + losses[1]) / 2), rel=1e-5)


def test_metrics_also_go_to_tensorboard_when_it_is_installed(tmp_path, monkeypatch):
    import types

    calls = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter (not a dependency of the pack)
        def __init__(self, logdir):
            calls.append(("init", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    out = tmp_path / "tb"
    run_inline([a for a in tiny_args("Compact", out) if a != "--no-tensorboard"])
    assert calls[0] == ("init", str(out / "tensorboard")) and calls[-1] == ("close",)
    assert ("train/loss", 1) in calls and ("train/loss", 2) in calls and ("val/psnr", 2) in calls
