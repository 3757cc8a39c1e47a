"""Network interpolation (training/interpolate.py): the blend, its checks and the written file."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors import safe_open

import archs
from training.interpolate import InterpolationError, interpolate_files, interpolate_state_dicts, main
from training.models import export_safetensors


def _flexnet(seed: int, dim: int = 16) -> torch.nn.Module:
    torch.manual_seed(seed)
    return archs.FlexNet(dim=dim, num_blocks=(1, 1), window_size=8, scale=2).eval()


def _eimn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = archs.EIMN_A(scale=2).eval()
    for m in model.modules():  # give batch norm statistics of their own to blend
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def test_state_dict_blend_is_linear_and_keeps_integer_buffers():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(7)}
    out = interpolate_state_dicts(a, b, 0.25)
    assert torch.equal(out["w"], torch.tensor([1.0, 3.0]))
    assert out["n"].item() == 3 and out["n"].dtype == a["n"].dtype
    assert torch.equal(interpolate_state_dicts(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate_state_dicts(a, b, 1.0)["w"], b["w"])


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_out_of_range_is_refused(alpha):
    with pytest.raises(InterpolationError, match="alpha"):
        interpolate_state_dicts({"w": torch.zeros(1)}, {"w": torch.ones(1)}, alpha)


def test_other_tensors_or_shapes_are_named():
    with pytest.raises(InterpolationError, match="only in A: \\['x'\\]"):
        interpolate_state_dicts({"w": torch.zeros(1), "x": torch.zeros(1)}, {"w": torch.ones(1)}, 0.5)
    with pytest.raises(InterpolationError, match="'w' has shape \\(2,\\)"):
        interpolate_state_dicts({"w": torch.zeros(2)}, {"w": torch.ones(3)}, 0.5)


def test_files_blend_into_a_loadable_model_with_provenance(tmp_path):
    ma, mb = _eimn(0), _eimn(1)
    pa = export_safetensors(ma, tmp_path / "a.safetensors", {"command": "train a"})
    pb = export_safetensors(mb, tmp_path / "b.safetensors", {"command": "train b", "seed": "5"})
    out = interpolate_files(pa, pb, 0.3, tmp_path / "c.safetensors")
    mc = archs.load_model(out).model
    sa, sb, sc = ma.state_dict(), mb.state_dict(), mc.state_dict()
    for key in sc:
        if sc[key].is_floating_point():
            torch.testing.assert_close(sc[key], 0.7 * sa[key] + 0.3 * sb[key], rtol=1e-6, atol=1e-6)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["b_command"] == "train b" and meta["b_seed"] == "5"
    assert meta["a"] == f"a.safetensors sha256={hashlib.sha256(pa.read_bytes()).hexdigest()}"
    assert meta["a_command"] == "train a" and "alpha = 0.3" in meta["interpolation"]
    assert meta["command"].startswith("python -m training.interpolate")  # its own, not a parent's
    # the blended model runs and differs from both parents
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ya, yb, yc = ma(x), mb(x), mc(x)
    assert not torch.allclose(yc, ya) and not torch.allclose(yc, yb)


def test_fused_flexnet_blends_its_branches(tmp_path):
    ma, mb = _flexnet(0), _flexnet(1)
    pa = export_safetensors(ma, tmp_path / "a.safetensors")
    pb = export_safetensors(mb, tmp_path / "b.safetensors")
    mc = archs.load_model(interpolate_files(pa, pb, 0.5, tmp_path / "c.safetensors")).model.eval()
    ref = _flexnet(0)
    ref.load_state_dict({k: (v + mb.state_dict()[k]) / 2 if v.is_floating_point() else v
                         for k, v in ma.state_dict().items()})
    for m in archs.fusable_modules(ref):
        m.refresh_fused()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(mc(x), ref(x), rtol=1e-5, atol=1e-5)


def test_refusals_leave_no_file(tmp_path):
    pa = export_safetensors(_flexnet(0), tmp_path / "a.safetensors")
    pb = export_safetensors(_flexnet(1, dim=24), tmp_path / "b.safetensors")
    pe = export_safetensors(_eimn(0), tmp_path / "e.safetensors")
    with pytest.raises(InterpolationError, match="shape"):
        interpolate_files(pa, pb, 0.5, tmp_path / "c.safetensors")
    with pytest.raises(InterpolationError, match="one architecture"):
        interpolate_files(pa, pe, 0.5, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()
    existing = tmp_path / "keep.safetensors"
    existing.write_bytes(b"earlier work")
    with pytest.raises(FileExistsError):
        interpolate_files(pa, pa, 0.5, existing)
    assert existing.read_bytes() == b"earlier work"
    assert main([str(pa), str(pe), "--alpha", "0.5", "--out", str(tmp_path / "d.safetensors")]) == 2
    assert not (tmp_path / "d.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "e.safetensors",
                                                          "keep.safetensors"]


def test_the_library_checks_architecture_scale_and_channels_once_for_every_caller(tmp_path):
    """The file tool refuses what the library refuses, with the library's InterpolationError naming it."""
    from spandrel.architectures.Compact import Compact

    def compact(scale: int, channels: int = 3):
        return archs.load_model(Compact(num_in_ch=channels, num_out_ch=channels, num_feat=8, num_conv=1,
                                        upscale=scale).state_dict())

    a = compact(2)
    with pytest.raises(archs.InterpolationError, match="A upscales x2, B x4"):
        archs.interpolate_descriptors(a, compact(4), 0.5)
    with pytest.raises(archs.InterpolationError, match="A maps 3 to 3 channels, B 1 to 1"):
        archs.interpolate_descriptors(a, compact(2, channels=1), 0.5)
    with pytest.raises(archs.InterpolationError, match="one architecture"):
        archs.interpolate_descriptors(a, archs.load_model(_flexnet(0).state_dict()), 0.5)
    mixed = archs.interpolate_descriptors(a, compact(2), 0.0)
    assert type(mixed) is type(a.model) and mixed is not a.model
    assert all(torch.equal(v, a.model.state_dict()[k]) for k, v in mixed.state_dict().items())
    pa = export_safetensors(_flexnet(0), tmp_path / "a.safetensors")
    torch.manual_seed(1)
    p4 = export_safetensors(archs.FlexNet(dim=16, num_blocks=(1, 1), window_size=8, scale=4).eval(),
                            tmp_path / "b4.safetensors")
    with pytest.raises(InterpolationError, match="a.safetensors upscales x2, b4.safetensors x4"):
        interpolate_files(pa, p4, 0.5, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def test_the_command_line_names_a_folder_out_and_a_full_disk(tmp_path, capsys):
    import os
    import subprocess
    import sys
    from pathlib import Path

    pa = export_safetensors(_flexnet(0), tmp_path / "a.safetensors")
    folder = tmp_path / "outdir.safetensors"
    folder.mkdir()
    assert main([str(pa), str(pa), "--alpha", "0.5", "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "Traceback" not in err
    # a real full disk: the file-size limit makes the write fail (EFBIG) in a child process
    root = Path(__file__).resolve().parents[1]
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            f"sys.path.insert(0, {str(root)!r}); from training.interpolate import main; "
            f"sys.exit(main([{str(pa)!r}, {str(pa)!r}, '--alpha', '0.5', '--out', {str(tmp_path / 'c.safetensors')!r}]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 1, res.stderr
    assert "No room to write 'c.safetensors'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "c.safetensors").exists() and not list(tmp_path.glob(".c.safetensors.tmp-*"))


def test_unblend_inverts_the_blend_and_refuses_alpha_zero():
    from archs.interpolate import unblend_state_dicts

    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(7)}
    c = interpolate_state_dicts(a, b, 0.25)
    back = unblend_state_dicts(a, c, 0.25)
    assert torch.equal(back["w"], b["w"]) and back["n"].item() == c["n"].item()
    with pytest.raises(InterpolationError, match="alpha 0"):
        unblend_state_dicts(a, c, 0.0)


def test_a_fine_tune_comes_back_from_its_blend_with_its_record(tmp_path):
    ma, mb = _eimn(0), _eimn(1)
    pa = export_safetensors(ma, tmp_path / "a.safetensors", {"command": "train a"})
    pb = export_safetensors(mb, tmp_path / "b.safetensors", {"command": "train b", "seed": "5"})
    pc = interpolate_files(pa, pb, 0.3, tmp_path / "c.safetensors")
    assert main([str(pa), str(pc), "--alpha", "0.3", "--unblend", "--out", str(tmp_path / "b2.safetensors")]) == 0
    back = archs.load_model(tmp_path / "b2.safetensors").model.state_dict()
    for key, v in mb.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(back[key], v, rtol=0, atol=1e-5)
    with safe_open(str(tmp_path / "b2.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["command"] == "train b" and meta["seed"] == "5"  # B's own record, not the blend's
    assert meta["recovered"].startswith(f"(c.safetensors sha256={hashlib.sha256(pc.read_bytes()).hexdigest()} - 0.7 x")
    assert "--unblend" in meta["recovered_command"]
    # the wrong alpha or the wrong base is named, and nothing is written
    assert main([str(pa), str(pc), "--alpha", "0.4", "--unblend", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main([str(pb), str(pc), "--alpha", "0.3", "--unblend", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main([str(pa), str(pb), "--alpha", "0.3", "--unblend", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()
