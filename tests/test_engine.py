"""The upscale engine: tile plans, blending weights, channel rules, seamlessness, out-of-memory resume."""

from __future__ import annotations

import math

import pytest
import torch
from spandrel import ImageModelDescriptor
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.SwinIR import SwinIR

from packutil import pack  # noqa: F401  (session fixture)


@pytest.fixture
def engine(pack):
    return pack.nodes.engine


@pytest.fixture
def tiles(pack):
    return pack.nodes.tiles


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def descriptor(pack, module: torch.nn.Module) -> ImageModelDescriptor:
    """A random module loaded through the pack's own loader (as a user's checkpoint would be)."""
    return pack.archs.load_model(module.eval().state_dict())


def compact(pack, scale=2, in_nc=3, out_nc=3, feat=8, conv=2):
    return descriptor(pack, Compact(num_in_ch=in_nc, num_out_ch=out_nc, num_feat=feat, num_conv=conv, upscale=scale))


def whole(engine, model, image):
    out, report = engine.upscale_image(model, image, tile_size=4096, overlap=0, device="cpu")
    assert report.tiles == image.shape[0]
    return out


# --------------------------------------------------------------------------------------------------
# Tile plans


@pytest.mark.parametrize("h, w, tile, align, overlap", [
    (200, 131, 64, 8, 32), (97, 300, 48, 16, 16), (1, 300, 64, 8, 32), (130, 130, 64, 64, 32), (400, 330, 64, 64, 32),
    (64, 64, 64, 8, 32),
])
def test_plan_partitions_the_image_with_aligned_context_only_where_tiles_meet(tiles, h, w, tile, align, overlap):
    layout = tiles.Layout.for_model(align, overlap)
    plan = tiles.plan_tiles(2, h, w, tile, layout)
    for index in (0, 1):
        cover = torch.zeros(h, w, dtype=torch.int32)
        for t in (t for t in plan if t.index == index):
            cover[t.y.start : t.y.end, t.x.start : t.x.end] += 1
            for span, length in ((t.y, h), (t.x, w)):
                assert span.lo % align == 0  # every window starts on the model's grid
                assert span.lo == max(0, span.start - layout.context)  # context only where the image goes on
                assert span.hi == min(length, span.end + layout.context)
                assert span.blend_start == (span.start > 0) and span.blend_end == (span.end < length)
                whole_axis = span.lo == 0 and span.hi == length  # context reaches everything: one run
                assert span.size <= max(tile, layout.min_tile()) + layout.blend or whole_axis
        assert bool((cover == 1).all()), "cores must cover every pixel exactly once"
    cores = sorted({t.x.size for t in plan if t.x.end < w})
    assert len(cores) <= 1, f"tiles along an axis are even (all but the last): {cores}"


def test_resplit_keeps_outer_edges_and_covers_the_same_pixels(tiles):
    layout = tiles.Layout.for_model(8, 32)
    plan = tiles.plan_tiles(1, 300, 260, 128, layout)
    pending = plan[3:]
    smaller = tiles.resplit(pending, 300, 260, 64, layout)
    assert len(smaller) > len(pending)
    for t in smaller:
        parent = next(p for p in pending if p.y.start <= t.y.start < p.y.end and p.x.start <= t.x.start < p.x.end)
        assert t.y.end <= parent.y.end and t.x.end <= parent.x.end
        if t.y.start == parent.y.start:
            assert t.y.blend_start == parent.y.blend_start
        if t.x.end == parent.x.end:
            assert t.x.blend_end == parent.x.blend_end
        assert t.y.size <= 64 + layout.blend and t.x.size <= 64 + layout.blend
    assert sum(t.core_area for t in smaller) == sum(t.core_area for t in pending)


def test_uniform_layout_gives_most_windows_one_shape(tiles):
    layout = tiles.Layout.for_model(8, 32, uniform=True)
    plan = tiles.plan_tiles(1, 512, 512, 128, layout)
    shapes = {}
    for t in plan:
        shapes[t.window_shape] = shapes.get(t.window_shape, 0) + 1
    assert max(shapes.values()) == len(plan) == 16  # 512 = 4 x 128, multiple of the grid: one shape


# --------------------------------------------------------------------------------------------------
# Blending


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_blend_weights_sum_to_one_even_after_a_resplit(pack, tiles, scale):
    blend = pack.nodes.blend
    h, w = 150, 133
    layout = tiles.Layout.for_model(8, 32)
    plan = tiles.plan_tiles(1, h, w, 64, layout)
    done, pending = plan[:4], tiles.resplit(plan[4:], h, w, 32, layout)
    out = torch.zeros(1, 2, h * scale, w * scale)
    for t in done + pending:
        wh, ww = t.window_shape
        blend.write_tile(out, 0, t, torch.ones(2, wh * scale, ww * scale), layout.blend, scale, h, w)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-6), float((out - 1).abs().max())


def test_crossfade_is_smooth_and_centred_on_the_edge(pack, tiles):
    blend = pack.nodes.blend
    span = tiles.Span(64, 128, 32, 160, True, True)
    wts = blend.axis_weights(span, 16, 1, 56, 136)
    assert float(wts[0]) < 0.01 and float(wts[8]) == pytest.approx(0.5, abs=0.05) and float(wts[16]) == 1.0
    assert bool((wts[:17].diff() >= 0).all()) and bool((wts[-17:].diff() <= 0).all())


# --------------------------------------------------------------------------------------------------
# Channels


def test_channel_rules(pack):
    ch = pack.nodes.channels
    assert [(j.src, j.dst) for j in ch.plan_channels(1, 3, 3)] == [((0,), (0,))]
    assert [(j.src, j.dst) for j in ch.plan_channels(3, 1, 1)] == [((0,), (0,)), ((1,), (1,)), ((2,), (2,))]
    rgba = ch.plan_channels(4, 3, 3, "bicubic")
    assert [(j.kind, j.dst) for j in rgba] == [("model", (0, 1, 2)), ("resample", (3,))]
    assert [j.kind for j in ch.plan_channels(4, 3, 3, "model", alpha_value=1.0)] == ["model", "fill"]
    assert ch.output_channels(4, 3, 3, "discard") == 3
    assert ch.output_channels(3, 4, 4, "model") == 3
    with pytest.raises(pack.archs.BadImageError, match="2 channels"):
        ch.plan_channels(2, 3, 3)
    with pytest.raises(pack.archs.BadImageError, match="6 -> 3"):
        ch.plan_channels(3, 6, 3)


# --------------------------------------------------------------------------------------------------
# Seamlessness: tiled == whole image


def _seam_psnr(engine, model, image, tile, overlap=32):
    ref = whole(engine, model, image)
    out, report = engine.upscale_image(model, image, tile_size=tile, overlap=overlap, device="cpu")
    assert out.shape == ref.shape
    assert report.tiles > image.shape[0], "the image must really be split"
    return psnr(out, ref), report


def test_convnets_tile_seamlessly(pack, engine):
    image = torch.rand(1, 72, 61, 3)
    esrgan = descriptor(pack, ESRGAN(num_filters=4, num_blocks=1, scale=2))
    value, _ = _seam_psnr(engine, esrgan, image, 32, overlap=24)
    assert value >= 50
    value, _ = _seam_psnr(engine, compact(pack, 4), image, 32, overlap=16)
    assert value >= 50


def test_window_attention_tiles_seamlessly_because_tiles_follow_the_window_grid(pack, engine):
    swin = descriptor(pack, SwinIR(img_size=32, embed_dim=12, depths=[2], num_heads=[2], window_size=8, mlp_ratio=2,
                                   upscale=2, upsampler="pixelshuffledirect"))
    assert engine.alignment(swin) == 8
    image = torch.rand(1, 72, 64, 3)
    value, report = _seam_psnr(engine, swin, image, 32)
    assert value >= 50, report.text()
    # without context the seams are there to see: the engine's context is what removes them
    no_context, _ = _seam_psnr(engine, swin, image, 32, overlap=0)
    assert no_context < 45


def _family_models(pack):
    found = []
    for support in pack.archs.REGISTRY.architectures("insertion"):
        arch = support.architecture
        if isinstance(arch, pack.archs.FlexSRArchitecture):
            found.append(pytest.param(arch, id=arch.id))
    return found or [pytest.param(None, marks=pytest.mark.skip(reason="no FlexSR family registered yet"))]


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames:
        from packutil import ROOT, load_pack

        metafunc.parametrize("family", _family_models(load_pack(ROOT, name="custom_nodes_x_FlexSR-under-test")))


def test_every_flexsr_family_tiles_seamlessly_down_to_64px(pack, engine, family):
    torch.manual_seed(0)
    module = family.signature_model().eval()
    model = family.load(module.state_dict()).eval()
    params = sum(p.numel() for p in model.model.parameters())
    assert params < 3_000_000, f"{family.id}'s signature model is too big for a seam test ({params:,} params)"
    context = pack.nodes.tiles.Layout.for_model(engine.grid_unit(model), 32).context
    height = max(96, 64 + context + 32)  # taller than one tile's window: really split
    image = torch.rand(1, height, 80, model.input_channels)
    value, report = _seam_psnr(engine, model, image, 64)
    assert value >= 50, f"{family.id}: {value:.1f} dB ({report.text()})"


def test_u_shaped_flexnet_tiles_seamlessly(pack, engine):
    """MetaFlexNet pads to 8 windows and sees far at its coarsest level: grid and context follow."""
    flexnet = pytest.importorskip(pack.archs.__name__ + ".flexnet")
    module = flexnet.FlexNet(dim=8, num_blocks=(1, 1, 1, 1), pipeline_type="meta", window_size=4, scale=2)
    model = descriptor(pack, module)
    assert engine.alignment(model) == 32
    value, report = _seam_psnr(engine, model, torch.rand(1, 168, 72, 3), 64)
    assert value >= 50 and report.context == 64, report.text()


# --------------------------------------------------------------------------------------------------
# Out of memory: halve the tile and carry on


class FlakyMemory(torch.nn.Module):
    """Wraps a model; raises torch.OutOfMemoryError for inputs of more than ``limit`` pixels per image."""

    def __init__(self, inner: torch.nn.Module, limit: int):
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.ok_shapes: list[tuple[int, ...]] = []
        self.failures = 0

    def forward(self, x):
        if x.shape[-1] * x.shape[-2] > self.limit:
            self.failures += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self.ok_shapes.extend([tuple(x.shape[-2:])] * x.shape[0])
        return self.inner(x)


def wrapped(model: ImageModelDescriptor, module: torch.nn.Module) -> ImageModelDescriptor:
    return ImageModelDescriptor(module, module.state_dict(), architecture=model.architecture, purpose=model.purpose, tags=[],
                                supports_half=False, supports_bfloat16=False, scale=model.scale,
                                input_channels=model.input_channels, output_channels=model.output_channels)


def test_out_of_memory_halves_the_tile_and_resumes(pack, engine, tiles, monkeypatch):
    monkeypatch.setattr(engine, "MAX_BATCH", 1)
    base = compact(pack, 2)
    flaky = FlakyMemory(base.model, limit=80 * 80)
    model = wrapped(base, flaky)
    image = torch.rand(1, 192, 192, 3)
    seen = []
    out, report = engine.upscale_image(model, image, tile_size=64, overlap=16, device="cpu",
                                       progress=lambda d, t: seen.append((d, t)))
    # 3x3 tiles of 64: the corner (window 80x80) runs, the next (80x96) fails; then 32 px tiles
    assert flaky.failures == 1 and report.oom_retries == 1 and report.tile == 32
    assert flaky.ok_shapes.count((80, 80)) == 1, "the finished corner tile is not run again"
    layout = tiles.Layout.for_model(engine.grid_unit(model), 16)
    restart = 1 + len(tiles.plan_tiles(1, 192, 192, 32, layout))
    tile_calls = [sh for sh in flaky.ok_shapes if sh not in ((16, 16), (32, 32))]  # less the progress probe's two
    assert report.tiles == len(tile_calls) < restart
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:])) and seen[-1][0] == seen[-1][1]
    assert psnr(out, whole(engine, base, image)) >= 50


def test_out_of_memory_below_the_floor_is_a_clear_error(pack, engine):
    base = compact(pack, 2)
    model = wrapped(base, FlakyMemory(base.model, limit=0))
    with pytest.raises(engine.UpscaleOutOfMemoryError, match="Out of memory .* even with 32px tiles"):
        engine.upscale_image(model, torch.rand(1, 100, 100, 3), tile_size=64, overlap=16, device="cpu")


def test_oom_in_a_batch_first_halves_the_batch(pack, engine):
    base = compact(pack, 2)

    class FailBigBatches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.batches = base.model, []

        def forward(self, x):
            if x.shape[0] > 2:
                raise torch.OutOfMemoryError("simulated")
            self.batches.append(x.shape[0])
            return self.inner(x)

    fail = FailBigBatches()
    image = torch.rand(5, 24, 24, 3)
    out, report = engine.upscale_image(wrapped(base, fail), image, tile_size=24, device="cpu")
    assert report.batch <= 2 and report.tile >= 24 and sum(fail.batches) == 5
    assert psnr(out, whole(engine, base, image)) > 100


# --------------------------------------------------------------------------------------------------
# Precision, passes, memory


def test_precision_never_one_the_model_does_not_support(pack, engine):
    model = compact(pack, 2)
    cpu = torch.device("cpu")
    assert engine.resolve_precision("auto", model, cpu) == torch.float32
    model.supports_half = False
    assert engine.resolve_precision("fp16", model, cpu) == torch.bfloat16
    model.supports_bfloat16 = False
    assert engine.resolve_precision("fp16", model, cpu) == torch.float32
    assert engine.resolve_precision("bf16", model, cpu) == torch.float32
    with pytest.raises(ValueError):
        engine.resolve_precision("fp8", model, cpu)


def test_bf16_runs_without_touching_the_weights(pack, engine):
    model = compact(pack, 2)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    image = torch.rand(1, 20, 16, 3)
    out, report = engine.upscale_image(model, image, precision="bf16", device="cpu")
    assert report.precision == "bf16" and out.dtype == torch.float32
    assert psnr(out, whole(engine, model, image)) > 30
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    assert model.dtype == torch.float32


@pytest.mark.parametrize("target, passes, size", [(1.0, 1, (15, 10)), (2.0, 1, (30, 20)), (3.0, 2, (45, 30)),
                                                  (4.0, 2, (60, 40)), (1.5, 1, (22, 15))])
def test_target_scale(pack, engine, target, passes, size):
    model = compact(pack, 2)
    image = torch.rand(1, 15, 10, 3)
    out, report = engine.upscale_image(model, image, target_scale=target, device="cpu")
    assert out.shape == (1, *size, 3) and report.passes == passes
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    if target == 4.0:  # two passes of the model, nothing else
        once = whole(engine, model, image)
        assert psnr(out, whole(engine, model, once)) > 100


def test_auto_tile_follows_the_memory_budget(pack, engine, tiles):
    model = compact(pack, 2)
    layout = tiles.Layout.for_model(8, 32)
    bpp = engine.estimate_bytes_per_pixel(model, torch.float32)
    assert engine.auto_tile(1e12, bpp, layout, 300, 200, 1) == 304  # fits: one tile covering 300 on the 8 px grid
    small = engine.auto_tile(bpp * 200**2, bpp, layout, 1000, 1000, 1)
    assert small % 8 == 0 and (small + 64) ** 2 <= 200**2 and small >= layout.min_tile()
    assert engine.auto_batch(bpp * 4 * 96**2, bpp, layout, 32, 1000, 1000) == 4


def test_alignment_reads_the_models_padding_unit(pack, engine):
    model = compact(pack, 2)
    assert engine.alignment(model) == 1 and engine.grid_unit(model) == 8
    model.model.pad_multiple = 64
    assert engine.alignment(model) == 64
    model.size_requirements.multiple_of = 3
    assert engine.alignment(model) == 192


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_finds_every_kind_of_non_finite_value(pack, dtype):
    all_finite = pack.nodes.engine.all_finite
    x = torch.rand(2, 37, 41, 3).to(dtype)
    assert all_finite(x) and all_finite(x.permute(0, 3, 1, 2)) and all_finite(x[:, :0])
    assert all_finite(torch.arange(5)), "integers are always finite"
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 36, 40, 2] = bad
        assert not all_finite(y) and not all_finite(y.permute(0, 3, 1, 2)), bad
    big = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)
    assert all_finite(big) and all_finite(-big), "large finite values are finite"
