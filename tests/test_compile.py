"""torch.compile as an option: off / auto (measured on this machine) / on, reuse across tiles and runs, eager
fallback.

``torch.compile`` is replaced by a stand-in that records what it was asked and runs the model eagerly
(a real compile takes tens of seconds on a CPU); the last test compiles one tiny model of every family
for real (about two minutes on a 2-core CPU): their inference forms must compile rather than fall back.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import pickle

import pytest
import torch
from spandrel.architectures.Compact import Compact

from packutil import pack  # noqa: F401  (session fixture)


class FakeCompile:
    """Stands in for ``torch.compile``: records each call and each run of the "compiled" model.

    ``fail`` is raised by ``torch.compile`` itself (``at="compile"``) or by the compiled model's first
    run (``at="run"``, as inductor fails: lazily, on the first call).
    """

    def __init__(self, fail: BaseException | None = None, at: str = "run"):
        self.fail, self.at = fail, at
        self.compiles: list[dict] = []
        self.runs: list[tuple] = []
        self.hooks_seen: list[int] = []

    def __call__(self, module, **options):
        self.compiles.append(options)
        if self.fail is not None and self.at == "compile":
            raise self.fail

        def run(x):
            self.runs.append(tuple(x.shape))
            self.hooks_seen.append(sum(len(m._forward_hooks) for m in module.modules()))
            if self.fail is not None:
                raise self.fail
            return module(x)

        return run


@pytest.fixture
def fake(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    stand_in = FakeCompile()
    monkeypatch.setattr(torch, "compile", stand_in)
    return stand_in


@pytest.fixture
def engine(pack):
    return pack.nodes.engine


def flexnet(pack):
    module = pack.archs.FlexNet(scale=2, dim=8, num_blocks=(1,), window_size=4).eval()
    return pack.archs.load_model(module.state_dict())


def compact(pack):
    module = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).eval()
    return pack.archs.load_model(module.state_dict())


def psnr(a, b):
    return 10 * math.log10(1 / max(float(((a.double() - b.double()) ** 2).mean()), 1e-20))


def image(h=40, w=56, b=1):
    return torch.rand(b, h, w, 3)


# --------------------------------------------------------------------------------------------------
# Choosing


@pytest.fixture
def decisions(pack, monkeypatch, tmp_path):
    """A fresh decisions file (and memory) for "auto"; ``measured`` records what was measured."""
    choices = pack.nodes.choices
    monkeypatch.setattr(choices, "_memory", {})
    monkeypatch.setenv("FLEXSR_COMPILE_CACHE", str(tmp_path / "cache" / "torch_compile"))
    return choices


def test_off_auto_on_and_auto_decides_by_a_measurement_it_remembers(pack, engine, decisions, monkeypatch):
    model, other = flexnet(pack), compact(pack)
    cpu = torch.device("cpu")
    measured = []
    speed = {"FlexNet": 1.4, "Compact": 0.98}

    def fake_measure(m, x, cache_dir=None):
        measured.append((m.architecture.id, tuple(x.shape)))
        s = speed[m.architecture.id]
        return {"pays": s >= decisions.COMPILE_MIN_SPEEDUP, "speedup": s}

    monkeypatch.setattr(decisions, "measure_compile", fake_measure)
    monkeypatch.setattr(decisions.compile_pays, "__defaults__", (None, None, fake_measure))
    img = image()
    assert engine.resolve_compile("auto", model, cpu, img) and not engine.resolve_compile("auto", other, cpu, img)
    assert measured == [("FlexNet", (1, 3, 64, 64)), ("Compact", (1, 3, 64, 64))]  # on a crop of the image
    assert engine.resolve_compile("auto", model, cpu, img) and len(measured) == 2  # remembered in memory ...
    monkeypatch.setattr(decisions, "_memory", {})
    assert engine.resolve_compile("auto", model, cpu, img) and len(measured) == 2  # ... and on disk
    saved = decisions.decisions_file().read_text()
    assert "compile | " in saved and "FlexNet" in saved and decisions.machine_key().split(" [")[0] in saved
    assert engine.resolve_compile("on", other, cpu) and not engine.resolve_compile("off", model, cpu)
    assert not engine.resolve_compile("auto", model, torch.device("meta"), img)  # a device never measured
    with pytest.raises(ValueError, match="compile must be one of"):
        engine.resolve_compile("yes", model, cpu)


@pytest.mark.parametrize("mode, pays, compiles", [
    ("off", True, False), ("auto", True, True), ("auto", False, False), ("on", False, True),
])
def test_upscale_compiles_only_when_asked_and_measured_faster(pack, engine, fake, decisions, monkeypatch, mode, pays,
                                                              compiles):
    def fake_measure(m, x, cache_dir=None):
        return {"pays": pays, "speedup": 1.5 if pays else 0.9}

    monkeypatch.setattr(decisions.compile_pays, "__defaults__", (None, None, fake_measure))
    model = flexnet(pack)
    img = image()
    out, report = engine.upscale_image(model, img, device="cpu", compile=mode)
    plain, _ = engine.upscale_image(model, img, device="cpu")
    assert torch.allclose(out, plain, atol=1e-6)  # (not bit-equal: CPU kernels round by buffer alignment)
    assert bool(fake.compiles) == compiles and bool(fake.runs) == compiles
    assert ("compiled" in report.text()) == compiles


def test_the_real_compile_measurement_times_both_and_reports_a_speedup(pack, decisions, fake):
    """The measurement itself (with the stand-in compile): a speed-up figure and a decision."""
    got = decisions.measure_compile(flexnet(pack), torch.rand(1, 3, 64, 64))
    assert set(got) >= {"pays", "speedup", "compile_s"} and got["speedup"] > 0 and fake.runs


# --------------------------------------------------------------------------------------------------
# Reuse


def test_compiled_once_per_shape_and_reused_by_later_tiles_and_runs(pack, engine, fake):
    model = flexnet(pack)
    img = image(72, 104)
    whole, _ = engine.upscale_image(model, img, device="cpu", tile_size=4096)
    out, report = engine.upscale_image(model, img, device="cpu", tile_size=32, overlap=8, compile="on")
    assert psnr(out, whole) >= 50  # uniform windows still match the whole image (the engine's bar)
    assert len(fake.compiles) == 1 and fake.compiles[0]["dynamic"] is False
    compiled = pack.archs.compiled(model)
    assert report.tiles > 4 and len(fake.runs) == report.model_calls
    assert len(compiled.shapes) == len(set(fake.runs)) <= 2  # uniform windows: few shapes, not one per edge
    assert set(fake.hooks_seen) == {0}  # no progress/cancel hooks inside a compiled model
    runs = len(fake.runs)
    engine.upscale_image(model, img, device="cpu", tile_size=32, overlap=8, compile="on")
    assert len(fake.compiles) == 1 and compiled.compiles == len(compiled.shapes)  # nothing compiled again
    assert len(fake.runs) == 2 * runs


def test_batches_are_even_and_a_short_last_one_is_filled(pack, engine, fake, monkeypatch):
    monkeypatch.setattr(engine, "MAX_BATCH", 2)
    model = flexnet(pack)
    img = image(32, 32, b=3)
    out, report = engine.upscale_image(model, img, device="cpu", tile_size=4096, compile="on")
    plain, _ = engine.upscale_image(model, img, device="cpu", tile_size=4096)
    assert torch.allclose(out, plain, atol=1e-6) and out.shape[0] == 3
    assert fake.runs == [(2, 3, 32, 32)] * 2 and report.model_calls == 2  # 2 + (1 filled to 2): one shape
    fake.runs.clear()
    engine.upscale_image(model, image(32, 32, b=5), device="cpu", tile_size=4096, compile="on")
    assert [r[0] for r in fake.runs] == [2, 2, 2]  # 5 tiles: 2, 2, 1 filled to 2 (the shape compiled above)
    monkeypatch.setattr(engine, "MAX_BATCH", 4)
    fake.runs.clear()
    engine.upscale_image(model, image(32, 32, b=5), device="cpu", tile_size=4096, compile="on")
    assert [r[0] for r in fake.runs] == [3, 3]  # 5 tiles at batch 4: two even calls of 3, not 4 + 1


def test_compiled_object_lives_with_the_network_not_its_state(pack):
    model = flexnet(pack)
    first = pack.archs.compiled(model)
    assert pack.archs.compiled(model.model) is first and pack.archs.compiled(model) is first
    assert pack.archs.compiled(model, max_shapes=2) is not first
    keys = set(model.model.state_dict())
    assert not any("compiled" in k for k in keys)
    copied = copy.deepcopy(model.model)
    assert pack.archs.compiled(copied) is not first and pack.archs.compiled(copied).module is copied
    restored = pickle.loads(pickle.dumps(model.model))
    assert pack.archs.compiled(restored).module is restored
    with pytest.raises(TypeError, match="nn.Module"):
        pack.archs.compiled("model")


def test_shapes_beyond_the_limit_run_eagerly(pack, fake):
    model = flexnet(pack).model
    compiled = pack.archs.compiled(model, max_shapes=2)
    with torch.inference_mode():
        for side in (16, 24, 32, 16):
            x = torch.rand(1, 3, side, side)
            assert torch.allclose(compiled(x), model(x), atol=1e-6)
    assert len(compiled.shapes) == 2 and compiled.eager_calls == 1 and compiled.failed is None
    assert fake.runs == [(1, 3, 16, 16), (1, 3, 24, 24), (1, 3, 16, 16)]


# --------------------------------------------------------------------------------------------------
# Failure


@pytest.mark.parametrize("at", ["compile", "run"])
def test_a_failed_compile_falls_back_to_eager_with_one_warning(pack, engine, monkeypatch, caplog, tmp_path, at):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    fake = FakeCompile(RuntimeError("InvalidCxxCompiler: No working C++ compiler found"), at=at)
    monkeypatch.setattr(torch, "compile", fake)
    model = flexnet(pack)
    img = image()
    plain, _ = engine.upscale_image(model, img, device="cpu")
    with caplog.at_level(logging.WARNING, logger="flexsr"):
        out, report = engine.upscale_image(model, img, device="cpu", compile="on")
        again, _ = engine.upscale_image(model, img, device="cpu", compile="on")
    assert torch.allclose(out, plain, atol=1e-6) and torch.allclose(again, plain, atol=1e-6)
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "No working C++ compiler" in warnings[0].getMessage()
    assert "failed → eager" in report.text() and "C++ compiler" in report.text()
    assert len(fake.compiles) == 1  # not tried again on the second run
    assert pack.archs.compiled(model).failed.startswith("RuntimeError")


def test_out_of_memory_passes_through_and_does_not_disable_compiling(pack, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch, "compile", FakeCompile(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")))
    compiled = pack.archs.compiled(flexnet(pack))
    with pytest.raises(RuntimeError, match="out of memory"):
        compiled(torch.rand(1, 3, 16, 16))
    assert compiled.failed is None and not compiled.shapes


def test_the_node_passes_compile_through_and_survives_a_failure(pack, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch, "compile", FakeCompile(NotImplementedError("aten::weird has no lowering")))
    nodes = pack.nodes.definitions
    spec = nodes.UpscaleImage.INPUT_TYPES()["optional"]["compile"]
    assert list(spec[0]) == ["off", "auto", "on"] and spec[1]["default"] == "off"
    model = flexnet(pack)
    img = image()
    with caplog.at_level(logging.WARNING, logger="flexsr"):
        result = nodes.UpscaleImage().upscale(model, img, compile="on")
    plain = nodes.UpscaleImage().upscale(model, img)["result"][0]
    assert torch.allclose(result["result"][0], plain, atol=1e-6)
    assert "failed → eager" in result["ui"]["flexsr_plan"][0]
    assert any("aten::weird" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------
# On-disk cache folder


def test_cache_folder_is_ours_unless_torch_already_has_one(pack, monkeypatch, tmp_path):
    compile_module = pack.archs.compile
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("FLEXSR_COMPILE_CACHE", str(tmp_path / "mine"))
    assert compile_module.use_cache_dir() == tmp_path / "mine"
    assert (tmp_path / "mine").is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "mine").resolve())
    assert compile_module.use_cache_dir(tmp_path / "other") == tmp_path / "mine"  # set once, then kept
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.delenv("FLEXSR_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_module.default_cache_dir() == tmp_path / "xdg" / "flexsr" / "torch_compile"


def test_inside_comfyui_the_cache_sits_in_its_user_folder(pack, monkeypatch, tmp_path):
    host = pack.nodes.host

    class FolderPaths:
        @staticmethod
        def get_filename_list(_name):
            return []

        @staticmethod
        def get_user_directory():
            return str(tmp_path / "user")

    monkeypatch.setattr(host, "folder_paths", lambda: FolderPaths)
    assert host.compile_cache_dir() == tmp_path / "user" / "flexsr" / "torch_compile"
    monkeypatch.setattr(host, "folder_paths", lambda: None)
    assert host.compile_cache_dir() is None


# --------------------------------------------------------------------------------------------------
# Real compiles, one tiny model per family


# Tiny configurations of every family: their inference forms (folded weights computed in the graph,
# oneDNN ops in eager mode) must compile, not fall back (a failed compile costs its time and gains nothing).
REAL_COMPILE_FAMILIES = {
    "FlexNet": lambda a: a.load_model(a.FlexNet(scale=2, dim=8, num_blocks=(1,), window_size=4).state_dict()).model,
    "MetaFlexNet": lambda a: a.MetaFlexNet(scale=2, dim=8, num_blocks=(1, 1, 1, 1)),
    "LMLT": lambda a: a.lmlt.LMLT(dim=8, n_blocks=1, upscaling_factor=2, window_size=4),
    "LAMNet": lambda a: a.lamnet.LAMNet(num_blocks=1, num_groups=1, dim=16, num_head=2, upscale=2),
    "EIMN": lambda a: a.eimn.EIMN(embed_dims=16, num_stages=1, scale=2),
    "TransformerSR": lambda a: a.transformer_sr.SR(factor=2, num_blocks=1, dim=32, window_size=4, num_heads=4),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(REAL_COMPILE_FAMILIES))
def test_a_real_compile_of_every_family_matches_eager(pack, family, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = REAL_COMPILE_FAMILIES[family](pack.archs).eval()
    compiled = pack.archs.compiled(model)
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        y, ref = compiled(x), model(x)
    assert compiled.failed is None and compiled.compiles == 1
    assert torch.allclose(y, ref, atol=1e-4)
