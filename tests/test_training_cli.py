"""Fine-tuning as a user meets it: Ctrl-C that saves and resumes by folder, a lock per run, a regression reported
as one, conflicting --resume arguments, a full disk, flag errors that name the flag, and the measured thread
count."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import finetune
from training.checkpoint import load_checkpoint, read_jsonl
from training.threads import ThreadTuner

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "Compact", "--arch-args", '{"num_feat": 8, "num_conv": 2}', "--batch-size", "2", "--patch-size",
        "16", "--synthetic-count", "2", "--synthetic-size", "24", "--synthetic-val-count", "1",
        "--synthetic-val-size", "16", "--threads", "1", "--no-progress", "--no-tensorboard"]


def script(argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "training/finetune.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}, **kw)


def wait_for(cond, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not cond():
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended too early:\n" + proc.stdout.read()


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_by_folder_alone_reproduces_the_uninterrupted_weights(tmp_path):
    base = [*TINY, "--steps", "10", "--save-every", "4", "--val-every", "5"]
    ref = tmp_path / "ref"
    assert finetune.main([*base, "--out", str(ref)]) == 0

    out = tmp_path / "run"
    proc = script([*base, "--out", str(out)], {"FLEXSR_DEBUG_STEP_SLEEP": "0.3"})
    wait_for(lambda: len(train_steps(out)) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, text
    assert "Traceback" not in text
    stopped = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 3 <= stopped < 10 and f"stopped after step {stopped} of 10" in text
    assert f"To continue: python training/finetune.py --resume {out}" in text
    assert not (out / "summary.json").exists()

    resumed = script(["--resume", str(out)])  # the folder alone: the run's own arguments come back
    text = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, text
    assert f"Resumed from {out / 'checkpoint.pt'} at step {stopped}" in text
    name = json.loads((ref / "summary.json").read_text())["model"]
    a, b = load_file(name), load_file(str(out / Path(name).name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert train_steps(out) == list(range(1, 11))  # each step recorded once


@pytest.mark.slow
def test_a_second_process_on_the_same_run_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = script([*TINY, "--steps", "200", "--save-every", "1", "--out", str(out)], {"FLEXSR_DEBUG_STEP_SLEEP": "0.2"})
    wait_for(lambda: (out / "checkpoint.pt").exists(), first)
    second = script(["--resume", str(out)])
    text = second.communicate(timeout=120)[0]
    assert second.returncode == 2, text
    assert f"in use by a running training process (pid {first.pid})" in text and "Traceback" not in text
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    third = script(["--resume", str(out), "--time-limit", "0.001"])  # the stale lock is taken over
    text = third.communicate(timeout=120)[0]
    assert third.returncode == 0, text


def test_a_fine_tune_that_gets_worse_says_so_and_exports_its_best_weights(tmp_path, capsys, caplog):
    good = tmp_path / "good"
    assert finetune.main([*TINY, "--steps", "30", "--lr", "3e-3", "--out", str(good), "--val-every", "0"]) == 0
    start_file = json.loads((good / "summary.json").read_text())["model"]
    bad = tmp_path / "bad"
    caplog.set_level("INFO", logger="flexsr")
    argv = [a for a in TINY if a not in ("--arch", "Compact", "--arch-args", '{"num_feat": 8, "num_conv": 2}')]
    assert finetune.main(["--pretrained", start_file, *argv, "--steps", "3", "--lr", "0.5", "--lr-warmup", "1",
                          "--ema", "0", "--val-every", "1", "--out", str(bad)]) == 0
    summary = json.loads((bad / "summary.json").read_text())
    start, last = summary["start_val"]["psnr"], summary["last_val"]["psnr"]
    assert last < start  # lr 0.5 wrecks it
    assert summary["exported"]["step"] == 0 and summary["val_psnr"] == pytest.approx(start)
    assert "ended BELOW its start" in caplog.text and "starting weights" in caplog.text
    assert Path(summary["model"]).name == f"{Path(start_file).stem}_ft.safetensors"  # never the parent's name
    assert "step 0 (the starting model, the baseline)" in caplog.text


def test_resume_with_other_settings_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune.main([*TINY, "--steps", "2", "--out", str(out)]) == 0
    with pytest.raises(SystemExit) as e:
        finetune.main(["--resume", str(out), "--arch-args", '{"num_feat": 16, "num_conv": 2}'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--arch-args" in err and "keeps its own settings" in err and "Traceback" not in err
    # runtime flags may change
    args = finetune.parse_args(["--resume", str(out), "--threads", "2", "--log-every", "7"])
    assert args.threads == 2 and args.log_every == 7 and args.arch == "Compact" and args.steps == 2


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_a_one_line_error_and_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    first = script([*TINY, "--steps", "50", "--save-every", "1", "--out", str(out)], {"FLEXSR_DEBUG_STEP_SLEEP": "0.2"})
    wait_for(lambda: (out / "checkpoint.pt").exists() and len(train_steps(out)) >= 2, first)
    first.send_signal(signal.SIGINT)
    assert first.communicate(timeout=120)[0] and first.returncode == 130
    good = (out / "checkpoint.pt").read_bytes()
    limit = len(good) // 2  # room for the log and metrics, not for a checkpoint (RLIMIT_FSIZE: a real EFBIG)

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    more = script(["--resume", str(out)], preexec_fn=small_files)
    text = more.communicate(timeout=120)[0]
    assert more.returncode == 1, text
    assert "No room to write 'checkpoint.pt'" in text and "The previous checkpoint is intact" in text
    assert "Traceback" not in text
    assert (out / "checkpoint.pt").read_bytes() == good
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # no partial file left


def test_flag_errors_name_the_flag_before_anything_loads(tmp_path, capsys):
    a_file = tmp_path / "pic.png"
    a_file.write_bytes(b"x")
    cases = [
        (["--data", str(a_file)], "argument --data", "is a file"),
        (["--arch", "Compact", "--scale", "5"], "argument --patch-size", "multiple of --scale 5"),
        (["--arch", "Compact", "--val-lr", "matlab+jpeg"], "argument --val-lr", "jpeg"),
    ]
    for argv, flag, words in cases:
        with pytest.raises(SystemExit):
            finetune.parse_args([*argv, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert flag in err and words in err and err.count("error:") == 1, err


def test_the_loss_form_change_is_announced(tmp_path, caplog):
    caplog.set_level("INFO", logger="flexsr")
    assert finetune.main([*TINY, "--steps", "4", "--edge-weight", "1", "--l1-warmup", "2",
                          "--out", str(tmp_path / "r")]) == 0
    assert "step 3: the loss is now edge-weighted L1" in caplog.text and "not a divergence" in caplog.text


def test_thread_tuner_keeps_the_faster_count_and_measures_again():
    now = [0.0]
    cost = {1: 1.0, 2: 3.0}  # a loaded machine: two threads are slower

    tuner = ThreadTuner([1, 2], probe_steps=2, recheck_s=100.0, clock=lambda: now[0])
    before = torch.get_num_threads()
    try:
        for _ in range(8):
            tuner.before_step()
            now[0] += cost[torch.get_num_threads()]
            tuner.after_step()
        assert tuner.chosen == 1 and torch.get_num_threads() == 1
        cost.update({1: 2.0, 2: 1.0})  # the load went away
        now[0] += 200  # past the recheck
        for _ in range(6):
            tuner.before_step()
            now[0] += cost[torch.get_num_threads()]
            tuner.after_step()
        assert tuner.chosen == 2 and len(tuner.history) == 2
    finally:
        torch.set_num_threads(before)
