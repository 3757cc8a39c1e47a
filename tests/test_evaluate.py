"""bench/evaluate.py, the one evaluation command, and the MATLAB bicubic it relies on."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from archs.eimn import EIMN
from archs.flexnet import FlexNet
from training.imresize import imresize, imresize_uint8

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def load_evaluate():
    name = "flexsr_bench_evaluate"
    if name not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "evaluate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def save_model(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.eval().state_dict().items()}, str(path))
    return path


def nearest_model(path: Path, scale: int) -> Path:
    """Compact (SRVGGNetCompact) with all-zero weights: its output is the nearest-neighbour upscale."""
    from spandrel.architectures.Compact import Compact

    model = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=1, upscale=scale)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return save_model(model, path)


def y_channel(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of a uint8 RGB image, written out independently of training.metrics."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    return 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0


# --------------------------------------------------------------------------------------------------
# MATLAB bicubic


def _max_diffs(root: Path, scale: int):
    for hr_path in sorted((root / "GTmod12").glob("*.png")):
        hr = torch.from_numpy(np.array(Image.open(hr_path).convert("RGB"))).permute(2, 0, 1)
        shipped = torch.from_numpy(np.array(Image.open(root / f"LRbicx{scale}" / hr_path.name).convert("RGB")))
        ours = imresize_uint8(hr, 1 / scale).permute(1, 2, 0)
        assert ours.shape == shipped.shape, hr_path.name
        yield (ours.int() - shipped.int()).abs()


@pytest.mark.parametrize("name,scale", [("Set5", 2), ("Set5", 3), ("Set5", 4), ("Set14", 4)])
def test_matlab_bicubic_reproduces_the_shipped_lr_files(name, scale):
    root = DATA / name
    if not (root / f"LRbicx{scale}").is_dir():
        pytest.skip(f"{root} not found")
    diffs = torch.cat([d.flatten() for d in _max_diffs(root, scale)])
    within_one = float((diffs <= 1).double().mean())
    exact = float((diffs == 0).double().mean())
    assert within_one >= 0.99, within_one
    assert exact >= 0.99, exact  # measured: >= 99.99 % exact, never more than 1 level off


def test_matlab_bicubic_upscale_keeps_constants_and_interior_ramps():
    const = torch.full((3, 9, 7), 0.3, dtype=torch.float64)
    up = imresize(const, 2)
    assert up.shape == (3, 18, 14) and torch.allclose(up, const[:, :1, :1].expand_as(up), atol=1e-12)
    # cubic convolution reproduces linear functions away from the mirrored borders
    ramp = torch.arange(16, dtype=torch.float64).view(1, 16).expand(16, 16).clone()
    out = imresize(ramp, 2)
    x = (torch.arange(32, dtype=torch.float64) + 0.5) / 2 - 0.5  # input coordinate of each output pixel
    assert torch.allclose(out[4:-4, 4:-4], x[4:-4].view(1, -1).expand(24, 24), atol=1e-9)


# --------------------------------------------------------------------------------------------------
# The command


def test_psnr_of_two_tiny_images_matches_a_hand_computation(tmp_path):
    """The whole path (files, model, rounding, Y, border, mean) against plain numpy formulas."""
    rng = np.random.default_rng(3)
    scale, names = 2, ("a", "b")
    root = tmp_path / "data" / "Tiny"
    expected = {}
    for name, (h, w) in zip(names, [(24, 20), (18, 26)]):
        hr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        lr = rng.integers(0, 256, (h // scale, w // scale, 3), dtype=np.uint8)
        save_png(root / "GTmod12" / f"{name}.png", hr)
        save_png(root / f"LRbicx{scale}" / f"{name}.png", lr)
        sr = lr.repeat(scale, axis=0).repeat(scale, axis=1)  # what the zero-weight Compact outputs
        d = (y_channel(sr) - y_channel(hr))[scale:-scale, scale:-scale]
        expected[name] = 10 * math.log10(255.0**2 / np.mean(d**2))
    model = nearest_model(tmp_path / "nearest_x2.safetensors", scale)
    out = tmp_path / "out.json"
    argv = ["--data-root", str(tmp_path / "data"), "--sets", "Tiny", "--no-published", "--scales", "2",
            "--lr", "matlab", "--model", str(model), "--json", str(out)]
    assert load_evaluate().main(argv) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    got = rows["nearest_x2"]["results"]["Tiny|matlab"]
    assert got["n"] == 2
    for name in names:
        assert got["per_image"][name][0] == pytest.approx(expected[name], abs=1e-9)
    assert got["psnr"] == pytest.approx(np.mean(list(expected.values())), abs=1e-9)
    assert rows["bicubic"]["results"]["Tiny|matlab"]["n"] == 2


def _art_folder(root: Path) -> Path:
    """Three images of two kinds (file names as the art builder writes them), one flat, one broken."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:44]
    for i, kind in enumerate(("clipart", "painting", "clipart")):
        base = (np.sin(xx / (3 + i)) * np.cos(yy / (4 + i)) * 100 + 128)[..., None] + rng.normal(0, 6, (40, 44, 3))
        save_png(root / f"pack{i % 2}" / f"{kind}_img{i}.png", np.clip(base, 0, 255).astype(np.uint8))
    save_png(root / "flat.png", np.full((40, 40, 3), 77, dtype=np.uint8))  # one colour: skipped
    (root / "broken.png").write_bytes(b"\x89PNG not really")  # unreadable: skipped
    (root / "manifest.jsonl").write_text("{}\n")
    return root


def test_command_end_to_end_on_tiny_models_and_a_tiny_art_folder(tmp_path, capsys):
    if not (DATA / "Set5" / "GTmod12").is_dir():
        pytest.skip("Set5 not found")
    torch.manual_seed(0)
    x2 = save_model(FlexNet(dim=8, num_blocks=(1, 1), scale=2), tmp_path / "tiny_x2.safetensors")
    x4 = save_model(EIMN(embed_dims=4, num_stages=1, scale=4), tmp_path / "tinyeimn_x4.safetensors")
    art = _art_folder(tmp_path / "art")
    js, md = tmp_path / "eval.json", tmp_path / "eval.md"
    specs = ["matlab", "lanczos", "box", "matlab+jpeg75"]
    argv = ["--data-root", str(DATA), "--sets", "Set5", "--images", "bird", "--no-published", "--scales", "2",
            "--model", str(x2), str(x4), "--art", str(art), "--reference", "tiny", "--lr", *specs,
            "--json", str(js), "--markdown", str(md)]
    assert load_evaluate().main(argv) == 0
    text = capsys.readouterr().out
    assert "images per group: Set5 1, art 3, art:clipart 2, art:painting 1" in text
    assert "one colour" in text and "unreadable" in text and "at start" in text and "avx" in text.lower()
    assert "difference to tiny" in text and "== LR: matlab+jpeg75" in text
    report = json.loads(js.read_text())
    rows = {(r["scale"], r["model"]): r for r in report["rows"]}
    # bicubic at every scale evaluated; each model only at its own scale
    assert set(rows) == {(2, "bicubic"), (2, "tiny_x2"), (4, "bicubic"), (4, "tinyeimn_x4")}
    assert report["art"]["skipped"] == {"unreadable": 1, "one colour": 1}
    assert report["art"]["kinds"] == {"clipart": 2, "painting": 1}
    groups = ("Set5", "art", "art:clipart", "art:painting")
    for row in rows.values():
        assert set(row["results"]) == {f"{g}|{spec}" for g in groups for spec in specs}
        for res in row["results"].values():
            assert 5 < res["psnr"] < 60 and 0 < res["ssim"] <= 1
        # the whole art set is the mean over its kinds' images
        per = row["results"]
        assert per["art|matlab"]["psnr"] == pytest.approx(
            (2 * per["art:clipart|matlab"]["psnr"] + per["art:painting|matlab"]["psnr"]) / 3)
    # the LR kinds are different inputs
    bic = rows[(4, "bicubic")]["results"]
    assert len({round(bic[f"art|{c}"]["psnr"], 6) for c in specs}) == len(specs)
    assert "| x2 | tiny_x2 |" in md.read_text()


def test_guard_passes_a_model_against_itself_and_fails_a_worse_one(tmp_path, capsys):
    if not (DATA / "Set5" / "GTmod12").is_dir():
        pytest.skip("Set5 not found")
    torch.manual_seed(0)
    ref = nearest_model(tmp_path / "ref_x2.safetensors", 2)  # nearest neighbour
    worse = save_model(FlexNet(dim=8, num_blocks=(1, 1), scale=2), tmp_path / "random_x2.safetensors")  # noise
    same = tmp_path / "same_x2.safetensors"
    same.write_bytes(ref.read_bytes())
    art = _art_folder(tmp_path / "art")
    base = ["--data-root", str(DATA), "--sets", "Set5", "--images", "bird", "--no-published", "--scales", "2",
            "--art", str(art), "--reference", "ref", "--lr", "matlab", "--guard"]
    evaluate = load_evaluate()
    assert evaluate.main([*base, "--model", str(ref), str(same)]) == 0
    assert "-> PASS" in capsys.readouterr().out
    assert evaluate.main([*base, "--model", str(ref), str(worse)]) == 3
    text = capsys.readouterr().out
    assert "guard x2 random_x2 vs ref_x2" in text and "-> FAIL" in text and "art:painting" in text
    # a named guard checks only the models it names
    assert evaluate.main([*base, "ref_x2", "--model", str(ref), str(worse)]) == 0
    text = capsys.readouterr().out
    assert "guard x2 ref_x2" in text and "guard x2 random_x2" not in text


def test_tiled_engine_path_matches_the_whole_image_forward(tmp_path):
    evaluate = load_evaluate()
    torch.manual_seed(0)
    path = save_model(FlexNet(dim=8, num_blocks=(1, 1), scale=2), tmp_path / "tiny_x2.safetensors")
    row = evaluate.model_row(path, "model")
    lr = torch.rand(1, 3, 70, 90)
    whole = evaluate.Runner("cpu", whole_max=1024, tile=32)(row, lr)
    runner = evaluate.Runner("cpu", whole_max=16, tile=32)
    tiled = runner(row, lr)
    assert runner.tiled == 1 and tiled.shape == whole.shape == (1, 3, 140, 180)
    mse = float((tiled - whole).pow(2).mean())
    assert mse == 0 or 10 * math.log10(1 / mse) >= 50


def test_bad_arguments_are_reported(tmp_path, capsys):
    evaluate = load_evaluate()
    with pytest.raises(SystemExit):
        evaluate.main(["--sets", "NoSuchSet", "--data-root", str(tmp_path)])
    assert "no benchmark set NoSuchSet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(tmp_path / "missing.pth")])
    assert "does not exist" in capsys.readouterr().err


def test_set_lr_is_the_shipped_file_when_clean_and_made_from_hr_otherwise():
    from training.degradations import make_lr

    evaluate = load_evaluate()
    root = DATA / "Set5"
    if not (root / "LRbicx2").is_dir():
        pytest.skip("Set5 not found")
    (name, lr, hr), = list(evaluate.bench_pairs(root, 2, "matlab", ["bird"]))
    shipped = torch.from_numpy(np.array(Image.open(root / "LRbicx2" / "bird.png").convert("RGB"))).permute(2, 0, 1)
    assert torch.equal((lr[0] * 255).round().byte(), shipped)
    (_, lr75, _), = list(evaluate.bench_pairs(root, 2, "matlab+jpeg75", ["bird"]))
    assert torch.equal(lr75, make_lr(hr, 2, "matlab+jpeg75"))
    want = (imresize(hr.double() * 255, 0.5).round().clamp(0, 255) / 255).float()
    got = make_lr(hr, 2, "matlab")
    assert (got - want).abs().max() <= 1 / 255 + 1e-6 and float((got == want).float().mean()) > 0.999


def load_sweep():
    load_evaluate()
    name = "flexsr_bench_interpolation_sweep"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "interpolation_sweep.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_sweep_picks_the_eligible_alpha_whose_smallest_gain_is_largest():
    pick = load_sweep().pick
    gains = {0.3: {"a": 0.4, "b": 0.1}, 0.5: {"a": 0.6, "b": 0.3}, 1.0: {"a": 2.0, "b": -0.2}}
    assert pick(gains) == 0.5
    assert pick(gains, eligible={0.3, 1.0}) == 0.3  # 0.5 failed the clean guard
    assert pick(gains, eligible=set()) is None  # none passes: ship the base
    assert pick({0.4: {"a": 0.2}, 0.6: {"a": 0.2}}) == 0.4  # a tie keeps more of the base


def test_sweep_end_to_end_scores_blends_and_writes_the_chosen_one(tmp_path, capsys):
    torch.manual_seed(0)
    base = save_model(FlexNet(dim=8, num_blocks=(1, 1), scale=2), tmp_path / "base_x2.safetensors")
    torch.manual_seed(1)
    tuned = save_model(FlexNet(dim=8, num_blocks=(1, 1), scale=2), tmp_path / "tuned_x2.safetensors")
    art = _art_folder(tmp_path / "art")
    out = tmp_path / "chosen.safetensors"
    sweep = load_sweep()
    # two random networks: with a tolerance that admits both, one is chosen and written
    assert sweep.main(["--base", str(base), "--tuned", str(tuned), "--art", str(art), "--alphas", "0.5", "1",
                       "--lr", "matlab", "box", "--tolerance", "1000", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.split(" ")[0] in ("0.5", "1")]
    assert len(lines) == 2 and sum("<- chosen" in ln for ln in lines) == 1
    assert "clipart" in text and "painting" in text  # every kind of art is scored on its own
    chosen = 0.5 if "<- chosen" in lines[0] else 1.0
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert f"alpha = {chosen:g}" in meta["interpolation"] and "interpolation_sweep.py" in meta["command"]
    # the tuned model scored against itself as the base: a blend no better and no worse passes the guard
    assert sweep.main(["--base", str(tuned), "--tuned", str(tuned), "--art", str(art), "--alphas", "0.5",
                       "--lr", "matlab"]) == 0
    assert "<- chosen" in capsys.readouterr().out
    # an existing --out is refused before any work
    with pytest.raises(SystemExit):
        sweep.main(["--base", str(base), "--tuned", str(tuned), "--art", str(art), "--out", str(out)])
