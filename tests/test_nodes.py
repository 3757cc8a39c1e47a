"""FlexSR's ComfyUI nodes, called directly, with the pack imported the way ComfyUI imports it."""

from __future__ import annotations

import math
import sys

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from spandrel import MAIN_REGISTRY, ImageModelDescriptor, ModelLoader
from spandrel.architectures.Compact import Compact

from packutil import (  # noqa: F401  (pack: session fixture)
    ROOT,
    ComfyStandIns,
    comfy_module_name,
    foreign_nodes_module,
    load_pack,
    pack,
    spandrel_registry_restored,
)

NODE_IDS = ("FlexSRLoadUpscaleModel", "FlexSRUpscaleImage", "FlexSRFuseOmniShift", "FlexSRInterpolateUpscaleModels",
            "FlexSRSaveUpscaleModel")


@pytest.fixture
def nodes(pack):
    return pack.nodes.definitions


@pytest.fixture
def models_dir(tmp_path, monkeypatch, pack):
    folder = tmp_path / "upscale_models"
    folder.mkdir()
    monkeypatch.setenv("FLEXSR_UPSCALE_MODELS", str(folder))
    return folder


def compact(pack, scale=2, in_nc=3, out_nc=3):
    module = Compact(num_in_ch=in_nc, num_out_ch=out_nc, num_feat=8, num_conv=2, upscale=scale).eval()
    return pack.archs.load_model(module.state_dict())


def run(model, image):
    """The model on a whole [B, H, W, C] image, spandrel's way (the reference for node outputs)."""
    with torch.no_grad():
        return model(image.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def upscale(nodes, model, image, **kw):
    kw.setdefault("precision", "fp32")  # "auto" may measure bf16 faster for a tiny model: these tests compare to fp32
    out = nodes.UpscaleImage().upscale(model, image, **kw)
    assert set(out) == {"ui", "result"}
    assert isinstance(out["ui"]["flexsr_plan"][0], str)
    return out["result"][0]


def psnr(a, b):
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


# --------------------------------------------------------------------------------------------------
# The pack as ComfyUI sees it


def test_pack_imports_like_comfyui_next_to_its_own_nodes_module(tmp_path):
    """custom_nodes/<odd folder name>/ loaded as ComfyUI does, with ComfyUI's modules (stand-ins) present."""
    folder = tmp_path / "custom_nodes" / "Flex SR.v1-copy"
    folder.parent.mkdir()
    folder.symlink_to(ROOT, target_is_directory=True)
    models = tmp_path / "upscale_models"
    (models / "sub").mkdir(parents=True)
    torch.save(Compact(num_feat=4, num_conv=1, upscale=2).state_dict(), models / "sub" / "tiny.pth")
    comfy = ComfyStandIns(models)
    name = comfy_module_name(folder)
    before = set(sys.modules)
    previous_nodes = sys.modules.get("nodes")
    foreign = foreign_nodes_module()
    sys.modules["nodes"] = foreign  # ComfyUI's own nodes.py is imported before any pack
    registered = {a.architecture.id for a in MAIN_REGISTRY.architectures("insertion")}
    try:
        with spandrel_registry_restored(), comfy.installed():
            module = load_pack(folder, foreign_nodes=False, leave_installed=True)
            installed = {a.architecture.id for a in MAIN_REGISTRY.architectures("insertion")}
            assert sys.modules["nodes"] is foreign, "the pack must not replace ComfyUI's nodes module"
            assert set(module.NODE_CLASS_MAPPINGS) == set(NODE_IDS)
            assert module.NODE_CLASS_MAPPINGS["FlexSRUpscaleImage"].__module__.startswith(name + ".nodes")
            ours = {a.architecture.id for a in module.archs.REGISTRY.architectures("insertion")}
            assert ours and ours <= installed, "loading the pack adds FlexSR's families to spandrel's registry"
            web = folder / module.WEB_DIRECTORY
            assert web.is_dir() and list(web.glob("*.js"))
            # the nodes use ComfyUI's folders, progress bar and model management
            nodes = module.NODE_CLASS_MAPPINGS
            assert nodes["FlexSRLoadUpscaleModel"].INPUT_TYPES()["required"]["model_name"][0] == ["sub/tiny.pth"]
            model = nodes["FlexSRLoadUpscaleModel"]().load("sub/tiny.pth")["result"][0]
            out = nodes["FlexSRUpscaleImage"]().upscale(model, torch.rand(1, 40, 40, 3), tile_size=16, overlap=8)
            assert out["result"][0].shape == (1, 80, 80, 3)
            assert comfy.progress[-1] == (1000, 1000) and len(comfy.progress) > 2
            comfy.interrupted = True
            with pytest.raises(comfy.modules["comfy.model_management"].InterruptProcessingException):
                nodes["FlexSRUpscaleImage"]().upscale(model, torch.rand(1, 40, 40, 3), tile_size=16, overlap=8)
        assert {a.architecture.id for a in MAIN_REGISTRY.architectures("insertion")} == registered
    finally:
        for key in set(sys.modules) - before:
            if key == name or key.startswith(name + "."):
                del sys.modules[key]
        if previous_nodes is None:
            sys.modules.pop("nodes", None)
        else:
            sys.modules["nodes"] = previous_nodes


def test_outside_comfyui_importing_the_pack_changes_nothing_global(pack):
    assert not pack.nodes.host.in_comfyui()
    registered = [a.architecture for a in MAIN_REGISTRY.architectures("insertion")]
    assert not [a.id for a in registered if isinstance(a, pack.archs.FlexSRArchitecture)]


def test_every_node_is_documented(pack):
    mappings = pack.NODE_CLASS_MAPPINGS
    assert set(mappings) == set(NODE_IDS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in mappings.items():
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].endswith("(FlexSR)")
        assert cls.CATEGORY == "FlexSR" and len(cls.DESCRIPTION) > 40
        assert callable(getattr(cls(), cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
        spec = cls.INPUT_TYPES()
        for group_name, group in spec.items():
            if group_name == "hidden":  # values ComfyUI fills in (the node's UNIQUE_ID): no widget, no tooltip
                continue
            for name, (kind, *opts) in group.items():
                assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"


# --------------------------------------------------------------------------------------------------
# Load


def test_loader_lists_subfolders_and_describes_the_model(pack, nodes, models_dir):
    module = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4)
    (models_dir / "anime").mkdir()
    torch.save(module.state_dict(), models_dir / "anime" / "tiny.pth")
    (models_dir / "notes.txt").write_text("not a model")
    choices = nodes.LoadUpscaleModel.INPUT_TYPES()["required"]["model_name"][0]
    assert "anime/tiny.pth" in choices and "notes.txt" not in choices
    out = nodes.LoadUpscaleModel().load("anime/tiny.pth")
    model, info = out["result"]
    assert isinstance(model, ImageModelDescriptor) and model.scale == 4
    assert out["ui"]["flexsr_info"] == [info]
    params = sum(p.numel() for p in module.parameters())
    for fact in ("Compact", "4×", f"{params:,}", "3 → 3", "sizes: any"):
        assert fact in info, (fact, info)


def test_loader_refuses_code_running_pickles(pack, nodes, models_dir):
    torch.save({"weights": torch.zeros(1), "code": print}, models_dir / "evil.pth")
    with pytest.raises(pack.archs.UnsafeCheckpointError):
        nodes.LoadUpscaleModel().load("evil.pth")


# --------------------------------------------------------------------------------------------------
# Upscale


def test_rgb_batch_shapes_dtype_range_and_values(pack, nodes):
    model = compact(pack, 2)
    image = torch.rand(3, 24, 20, 3)
    out = upscale(nodes, model, image)
    assert out.shape == (3, 48, 40, 3) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert psnr(out, run(model, image)) > 100


def test_grey_images_stay_grey(pack, nodes):
    model = compact(pack, 2)
    grey = torch.rand(2, 16, 12, 1)
    out = upscale(nodes, model, grey)
    assert out.shape == (2, 32, 24, 1)
    rgb = run(model, grey.expand(-1, -1, -1, 3))
    luma = (rgb * torch.tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True)
    assert psnr(out, luma) > 100


def test_grey_model_keeps_colour_channel_by_channel(pack, nodes):
    model = compact(pack, 2, in_nc=1, out_nc=1)
    image = torch.rand(1, 12, 10, 3)
    out = upscale(nodes, model, image)
    assert out.shape == (1, 24, 20, 3)
    for c in range(3):
        assert psnr(out[..., c : c + 1], run(model, image[..., c : c + 1])) > 100


def test_rgba_model_takes_rgb_images(pack, nodes):
    model = compact(pack, 2, in_nc=4, out_nc=4)
    image = torch.rand(1, 12, 10, 3)
    out = upscale(nodes, model, image)
    opaque = torch.cat([image, torch.ones_like(image[..., :1])], -1)
    assert out.shape == (1, 24, 20, 3) and psnr(out, run(model, opaque)[..., :3]) > 100


@pytest.mark.parametrize("alpha", ["model", "bicubic", "discard"])
def test_rgba_alpha_modes(pack, nodes, alpha):
    model = compact(pack, 2)
    image = torch.rand(2, 14, 18, 4)
    out = upscale(nodes, model, image, alpha=alpha)
    assert out.shape == (2, 28, 36, 3 if alpha == "discard" else 4)
    assert psnr(out[..., :3], run(model, image[..., :3])) > 100
    if alpha == "model":
        want = run(model, image[..., 3:].expand(-1, -1, -1, 3)).mean(-1, keepdim=True)
        assert psnr(out[..., 3:], want) > 100
    elif alpha == "bicubic":
        want = F.interpolate(image[..., 3:].permute(0, 3, 1, 2), scale_factor=2, mode="bicubic").clamp(0, 1)
        assert psnr(out[..., 3:], want.permute(0, 2, 3, 1)) > 100


def test_mask_supplies_alpha(pack, nodes):
    model = compact(pack, 2)
    image = torch.rand(2, 10, 8, 3)
    flat = upscale(nodes, model, image, mask=torch.full((1, 10, 8), 0.25))
    assert flat.shape == (2, 20, 16, 4) and bool((flat[..., 3] == 0.75).all())  # ComfyUI: alpha = 1 - mask
    mask = torch.rand(2, 5, 4)  # another size: resized to the image
    out = upscale(nodes, model, image, mask=mask, invert_mask=False, alpha="bicubic")
    alpha = F.interpolate(mask[:, None], size=(10, 8), mode="bilinear")
    alpha = F.interpolate(alpha, scale_factor=2, mode="bicubic").clamp(0, 1)[:, 0]
    assert psnr(out[..., 3], alpha) > 100


@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (300, 1), (2, 3)])
def test_tiny_and_extreme_aspect_images(pack, nodes, shape):
    model = compact(pack, 2)
    image = torch.rand(1, *shape, 3)
    out = upscale(nodes, model, image, tile_size=64)
    assert out.shape == (1, shape[0] * 2, shape[1] * 2, 3)
    assert psnr(out, run(model, image)) >= 50


def test_target_scale_and_precision_inputs(pack, nodes):
    model = compact(pack, 4)
    image = torch.rand(1, 16, 12, 3)
    out = upscale(nodes, model, image, target_scale=2.0, precision="fp32")
    assert out.shape == (1, 32, 24, 3)
    down = F.interpolate(run(model, image).permute(0, 3, 1, 2), size=(32, 24), mode="bicubic", antialias=True)
    assert psnr(out, down.clamp(0, 1).permute(0, 2, 3, 1)) > 100


def test_progress_reaches_the_end(pack, nodes, monkeypatch):
    seen = []
    monkeypatch.setattr(pack.nodes.host, "progress_callback", lambda cur, total: seen.append((cur, total)))
    monkeypatch.setattr(pack.nodes.engine, "MAX_BATCH", 1)
    upscale(nodes, compact(pack, 2), torch.rand(2, 48, 40, 3), tile_size=16, overlap=8)
    assert seen[-1] == (1000, 1000) and len(seen) > 2
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


class CancelOnCall(torch.nn.Module):
    def __init__(self, inner, host, at: int):
        super().__init__()
        self.inner, self.host, self.at, self.calls = inner, host, at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            self.host.request_interrupt()  # the user presses cancel while this tile runs
        return self.inner(x)


def test_cancel_stops_within_one_tile(pack, nodes, monkeypatch):
    host, engine = pack.nodes.host, pack.nodes.engine
    monkeypatch.setattr(engine, "MAX_BATCH", 1)
    base = compact(pack, 2)
    spy = CancelOnCall(base.model, host, at=3)
    model = ImageModelDescriptor(spy, spy.state_dict(), architecture=base.architecture, purpose="SR", tags=[],
                                 supports_half=False, supports_bfloat16=False, scale=2, input_channels=3,
                                 output_channels=3)
    with pytest.raises(host.Interrupted):
        upscale(nodes, model, torch.rand(1, 64, 64, 3), tile_size=16)
    assert spy.calls == 3
    out = upscale(nodes, model, torch.rand(1, 8, 8, 3))  # the flag is consumed: the next run works
    assert out.shape == (1, 16, 16, 3)


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors


def test_bad_images_are_refused_clearly(pack, nodes):
    model = compact(pack, 2)
    bad = torch.rand(1, 8, 8, 3)
    bad[0, 3, 3, 1] = float("nan")
    with pytest.raises(pack.archs.BadImageError, match="NaN"):
        upscale(nodes, model, bad)
    bad[0, 3, 3, 1] = float("inf")
    with pytest.raises(pack.archs.BadImageError, match="infinite"):
        upscale(nodes, model, bad)
    with pytest.raises(pack.archs.BadImageError, match="mixes image sizes"):
        upscale(nodes, model, [torch.rand(1, 8, 8, 3), torch.rand(1, 9, 8, 3)])
    same = upscale(nodes, model, [torch.rand(1, 8, 8, 3), torch.rand(2, 8, 8, 3)])
    assert same.shape == (3, 16, 16, 3)
    with pytest.raises(pack.archs.BadImageError, match="2 channels"):
        upscale(nodes, model, torch.rand(1, 8, 8, 2))
    odd = pack.archs.load_model(Compact(num_in_ch=2, num_out_ch=2, num_feat=4, num_conv=1, upscale=2).state_dict())
    with pytest.raises(pack.archs.BadImageError, match="maps 2 -> 2 channels"):
        upscale(nodes, odd, torch.rand(1, 8, 8, 3))


# --------------------------------------------------------------------------------------------------
# Fuse


class OmniNet(torch.nn.Module):
    """A tiny SR net around an OmniShift, standing in for FlexSR's families."""

    def __init__(self, blocks):
        super().__init__()
        self.head = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.shift = blocks.OmniShift(8)
        self.tail = torch.nn.Sequential(torch.nn.Conv2d(8, 12, 3, padding=1), torch.nn.PixelShuffle(2))

    def forward(self, x):
        return self.tail(self.shift(self.head(x)))


def omni_model(pack):
    import importlib

    net = OmniNet(importlib.import_module(pack.archs.__name__ + ".blocks")).eval()
    arch = MAIN_REGISTRY.get("Compact").architecture  # any architecture object: only the fuse path is under test
    return ImageModelDescriptor(net, net.state_dict(), architecture=arch, purpose="SR", tags=["omni"],
                                supports_half=True, supports_bfloat16=True, scale=2, input_channels=3,
                                output_channels=3)


def test_fuse_returns_a_fused_copy_and_leaves_the_input_alone(pack, nodes):
    model = omni_model(pack)
    out = nodes.FuseOmniShift().fuse(model)
    fused, count = out["result"]
    assert count == 1 and fused is not model and "fused" in fused.tags
    assert fused.model.shift.fused and not model.model.shift.fused
    image = torch.rand(1, 12, 10, 3)
    assert torch.allclose(run(fused, image), run(model, image), atol=1e-5)
    again, count = nodes.FuseOmniShift().fuse(fused)["result"]
    assert again is fused and count == 0


def test_fuse_passes_other_models_through(pack, nodes):
    model = compact(pack, 2)
    same, count = nodes.FuseOmniShift().fuse(model)["result"]
    assert same is model and count == 0


def test_every_flexsr_family_fuses(pack, nodes):
    for support in pack.archs.REGISTRY.architectures("insertion"):
        arch = support.architecture
        model = arch.load(arch.signature_model().eval().state_dict()).eval()
        expected = len(pack.archs.fusable_modules(model))
        fused, count = nodes.FuseOmniShift().fuse(model)["result"]
        assert count == expected
        image = torch.rand(1, 16, 16, model.input_channels)
        assert torch.allclose(run(fused, image), run(model, image), atol=1e-4), arch.id


# --------------------------------------------------------------------------------------------------
# Interpolate


def test_interpolate_blends_weights_and_leaves_the_inputs_alone(pack, nodes):
    torch.manual_seed(0)
    a, b = compact(pack, 2), compact(pack, 2)
    before_a = {k: v.clone() for k, v in a.model.state_dict().items()}
    out = nodes.InterpolateUpscaleModels().interpolate(a, b, 0.25)
    (mixed,) = out["result"]
    assert "0.75 × A + 0.25 × B" in out["ui"]["flexsr_info"][0]
    assert mixed.model is not a.model and "interpolated" in mixed.tags and mixed.scale == 2
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k, v in mixed.model.state_dict().items():
        torch.testing.assert_close(v, 0.75 * sa[k] + 0.25 * sb[k], rtol=1e-6, atol=1e-7)
        assert torch.equal(sa[k], before_a[k])
    image = torch.rand(1, 12, 10, 3)
    assert torch.allclose(run(nodes.InterpolateUpscaleModels().interpolate(a, b, 0.0)["result"][0], image), run(a, image))
    assert torch.allclose(run(nodes.InterpolateUpscaleModels().interpolate(a, b, 1.0)["result"][0], image),
                          run(b, image), atol=1e-6)


def test_interpolate_blends_fused_flexnet_kernels_too(pack, nodes):
    torch.manual_seed(1)
    a, b = omni_model(pack), omni_model(pack)
    fa, _ = nodes.FuseOmniShift().fuse(a)["result"]
    fb, _ = nodes.FuseOmniShift().fuse(b)["result"]
    mixed = nodes.InterpolateUpscaleModels().interpolate(fa, fb, 0.5)["result"][0]
    unfused = nodes.InterpolateUpscaleModels().interpolate(a, b, 0.5)["result"][0]
    image = torch.rand(1, 12, 10, 3)
    assert torch.allclose(run(mixed, image), run(unfused, image), atol=1e-5)


def test_interpolate_refuses_other_scales_and_architectures(pack, nodes):
    with pytest.raises(pack.archs.InterpolationError, match="x2, model B x4"):
        nodes.InterpolateUpscaleModels().interpolate(compact(pack, 2), compact(pack, 4), 0.5)
    with pytest.raises(pack.archs.InterpolationError, match="one architecture"):
        nodes.InterpolateUpscaleModels().interpolate(compact(pack, 2), omni_model(pack), 0.5)
    with pytest.raises(pack.archs.InterpolationError, match="alpha"):
        nodes.InterpolateUpscaleModels().interpolate(compact(pack, 2), compact(pack, 2), 1.5)


# --------------------------------------------------------------------------------------------------
# Save


def test_save_then_load_with_both_loaders(pack, nodes, models_dir):
    model = compact(pack, 2)
    out = nodes.SaveUpscaleModel().save(model, "my model", overwrite=False)
    path = models_dir / "my model.safetensors"
    assert out["result"] == (str(path),) and path.is_file()
    assert [p.name for p in models_dir.iterdir()] == [path.name], "no temporary files are left"
    meta = pack.nodes.model_io.read_metadata(path)
    assert meta["flexsr.architecture"] == "Compact" and meta["flexsr.scale"] == "2"
    ours = nodes.LoadUpscaleModel().load("my model.safetensors")["result"][0]
    spandrels = ModelLoader().load_from_state_dict(safetensors.torch.load_file(path))
    image = torch.rand(1, 10, 9, 3)
    for loaded in (ours, spandrels):
        assert psnr(run(loaded, image), run(model, image)) == math.inf


def test_save_never_overwrites_unless_asked(pack, nodes, models_dir):
    first, second = compact(pack, 2), compact(pack, 2)
    nodes.SaveUpscaleModel().save(first, "m.safetensors")
    path = models_dir / "m.safetensors"
    before = path.read_bytes()
    with pytest.raises(pack.nodes.model_io.ModelExistsError, match="overwrite"):
        nodes.SaveUpscaleModel().save(second, "m")
    assert path.read_bytes() == before and len(list(models_dir.iterdir())) == 1
    nodes.SaveUpscaleModel().save(second, "m", overwrite=True)
    assert path.read_bytes() != before and len(list(models_dir.iterdir())) == 1


@pytest.mark.parametrize("name", ["../escape", "sub/model", "sub\\model", "..", "a..b", ".hidden", "", "   ", "x\x00y"])
def test_bad_save_names_write_nothing(pack, nodes, models_dir, name):
    with pytest.raises(pack.nodes.model_io.InvalidNameError):
        nodes.SaveUpscaleModel().save(compact(pack, 2), name)
    assert list(models_dir.iterdir()) == [] and not list(models_dir.parent.glob("*.safetensors"))


def test_fused_model_round_trips_fused(pack, nodes, models_dir):
    fused, _ = nodes.FuseOmniShift().fuse(omni_model(pack))["result"]
    path = pack.nodes.model_io.save(fused, "omni", folder=models_dir)
    assert pack.nodes.model_io.read_metadata(path)["flexsr.fused"] == "1"
    state = safetensors.torch.load_file(path)
    assert torch.equal(state["shift.conv5x5_reparam.weight"], fused.model.shift.conv5x5_reparam.weight)


def test_flexsr_families_interoperate_with_spandrel(pack, nodes, models_dir):
    """After install(): spandrel's (and so ComfyUI's) ModelLoader reads FlexSR files, and ours reads spandrel's."""
    families = pack.archs.REGISTRY.architectures("insertion")
    assert families
    for support in families:
        arch = support.architecture
        model = arch.load(arch.signature_model().eval().state_dict()).eval()
        path = pack.nodes.model_io.save(model, f"family_{arch.id}", folder=models_dir)
        with spandrel_registry_restored():
            with pytest.raises(Exception):  # spandrel alone does not know FlexSR's families ...
                ModelLoader().load_from_file(path)
            pack.archs.install()  # ... after install() it does (ComfyUI's loader uses this ModelLoader)
            theirs = ModelLoader().load_from_file(path)
        assert theirs.architecture.id == arch.id
        image = torch.rand(1, 12, 12, model.input_channels)
        assert torch.allclose(run(theirs, image), run(model, image), atol=1e-5)
    torch.save(Compact(num_feat=4, num_conv=1, upscale=2).state_dict(), models_dir / "compact.pth")
    assert nodes.LoadUpscaleModel().load("compact.pth")["result"][0].architecture.id == "Compact"


def test_loader_lists_the_shipped_models_first(pack, tmp_path, monkeypatch):
    host = pack.nodes.host
    (tmp_path / "AAA_first_alphabetically.pth").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "zzz.safetensors").write_bytes(b"")
    monkeypatch.setenv("FLEXSR_UPSCALE_MODELS", str(tmp_path))
    names = host.model_names()
    shipped = [n for n in host.SHIPPED_FIRST if (host.PACK_MODELS / n).is_file()]
    assert shipped and names[: len(shipped)] == shipped  # the pack's models, in their fixed order
    rest = names[len(shipped):]
    assert rest == sorted(rest) and {"AAA_first_alphabetically.pth", "sub/zzz.safetensors"} <= set(rest)
