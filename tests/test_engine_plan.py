"""The engine's automatic plan on a CPU: whole images when they fit, a bounded working set when they do not,
and the model's measured cost kept once known (no second probe)."""

from __future__ import annotations

import torch
from spandrel import ImageModelDescriptor
from spandrel.architectures.Compact import Compact

from packutil import pack  # noqa: F401  (session fixture)


class Counting(torch.nn.Module):
    """Wraps a model and records the input shape of every call."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.inner(x)


def counting_model(pack, scale=2):
    base = pack.archs.load_model(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale).state_dict())
    module = Counting(base.model)
    model = ImageModelDescriptor(module, module.state_dict(), architecture=base.architecture, purpose=base.purpose,
                                 tags=[], supports_half=False, supports_bfloat16=False, scale=scale,
                                 input_channels=3, output_channels=3)
    return model, module


def test_an_image_that_fits_runs_as_one_call_without_a_probe(pack):
    engine = pack.nodes.engine
    model, module = counting_model(pack)
    image = torch.rand(1, 200, 150, 3)
    out, report = engine.upscale_image(model, image, device="cpu")
    assert out.shape == (1, 400, 300, 3) and out.is_contiguous()
    assert report.tiles == 1 and report.model_calls == 1
    assert module.shapes == [(1, 3, 200, 150)], "no probe forward and no tiling for an image that fits"
    with torch.inference_mode():
        want = model(image.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
    assert (out - want).abs().max() <= 1e-6
    grey, _ = engine.upscale_image(model, torch.rand(2, 40, 30, 1), device="cpu")  # channel jobs: copied
    assert grey.shape == (2, 80, 60, 1) and torch.isfinite(grey).all()


def test_a_tiled_cpu_run_keeps_its_working_set_small_and_probes_once(pack, monkeypatch):
    engine = pack.nodes.engine
    monkeypatch.setattr(engine, "CPU_WORKSET", 8 << 20)  # the image does not fit whole
    monkeypatch.setattr(engine, "CPU_TILED_FLOOR", 4 << 20)
    monkeypatch.setattr(engine, "CPU_EFFICIENT_TILE", 16)
    model, module = counting_model(pack)
    image = torch.rand(1, 192, 160, 3)
    io_bytes = image.numel() * 4 * (1 + 4)
    _, report = engine.upscale_image(model, image, device="cpu")
    probes = [s for s in module.shapes[: -report.model_calls]]
    assert len(probes) == 1 and report.tiles > 1
    bpp = engine.measure_bytes_per_pixel(model, torch.float32, torch.device("cpu"), probes[0][-1])
    budget = max(engine.CPU_TILED_FLOOR, engine.CPU_TILED_SHARE * io_bytes)
    for shape in module.shapes[-report.model_calls :]:
        assert shape[0] * shape[2] * shape[3] * bpp <= budget
    module.shapes.clear()
    _, again = engine.upscale_image(model, image, device="cpu")
    assert len(module.shapes) == again.model_calls, "the measured cost is cached: no second probe"


def test_a_costly_model_still_gets_tiles_of_efficient_size(pack, monkeypatch):
    """A model that needs much memory per pixel is not cut into many small tiles whose context work would
    cost more than the memory saved: the working set covers one tile of CPU_EFFICIENT_TILE px."""
    engine = pack.nodes.engine
    model, module = counting_model(pack)
    monkeypatch.setattr(engine, "measure_bytes_per_pixel", lambda *a, **k: 200_000.0)  # ~EIMN x 30
    monkeypatch.setattr(engine, "estimate_bytes_per_pixel", lambda *a, **k: 200_000)
    monkeypatch.setattr(engine, "CPU_EFFICIENT_TILE", 96)
    monkeypatch.setattr(engine, "CPU_WORKSET", 8 << 30)
    monkeypatch.setattr(engine.host, "available_ram", lambda: 64 << 30)
    image = torch.rand(1, 400, 400, 3)
    _, report = engine.upscale_image(model, image, device="cpu")
    assert report.tiles > 1 and report.tile >= 96, report.plan
    monkeypatch.setattr(engine, "CPU_EFFICIENT_TILE", 0)  # without the floor the same model gets small tiles
    _, small = engine.upscale_image(model, image, device="cpu")
    assert small.tile < report.tile, (small.plan, report.plan)


def test_auto_precision_on_cpu_picks_bf16_only_for_listed_families_with_native_bf16(pack, monkeypatch):
    engine = pack.nodes.engine
    cpu = torch.device("cpu")
    flexnet = pack.archs.load_model(pack.archs.FlexNet(dim=8, num_blocks=(1,)).state_dict())
    compact, _ = counting_model(pack)
    compact.supports_bfloat16 = True
    monkeypatch.setattr(engine, "CPU_BF16_FAMILIES", frozenset({"FlexNet"}))
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    assert engine.resolve_precision("auto", flexnet, cpu) == torch.bfloat16
    assert engine.resolve_precision("auto", compact, cpu) == torch.float32
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    assert engine.resolve_precision("auto", flexnet, cpu) == torch.float32
    assert engine.resolve_precision("fp32", flexnet, cpu) == torch.float32


def test_native_bf16_detection_agrees_with_the_cpu_flags(pack):
    engine = pack.nodes.engine
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return
    if flags:
        assert engine.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


class FailsAbove(torch.nn.Module):
    """Raises an out-of-memory error for inputs of more than ``limit`` pixels."""

    def __init__(self, inner: torch.nn.Module, limit: int):
        super().__init__()
        self.inner, self.limit = inner, limit

    def forward(self, x):
        if x.shape[-1] * x.shape[-2] > self.limit:
            raise torch.OutOfMemoryError("simulated")
        return self.inner(x)


def test_a_whole_image_plan_that_runs_out_of_memory_falls_back_to_clean_tiles(pack):
    engine = pack.nodes.engine
    model, module = counting_model(pack)
    image = torch.rand(2, 96, 80, 3)
    want, report = engine.upscale_image(model, image, device="cpu")
    assert report.tiles == 2 and report.model_calls <= 2  # one tile per image: output left unfilled until written
    flaky = FailsAbove(module.inner, limit=70 * 70)
    small = ImageModelDescriptor(flaky, flaky.state_dict(), architecture=model.architecture, purpose=model.purpose,
                                 tags=[], supports_half=False, supports_bfloat16=False, scale=2, input_channels=3,
                                 output_channels=3)
    got, report = engine.upscale_image(small, image, device="cpu", overlap=8)
    assert report.oom_retries >= 1 and report.tiles > 2
    assert torch.isfinite(got).all()
    mse = float(((got.double() - want.double()) ** 2).mean())
    assert mse < 1e-10, mse


def test_kept_heap_nests_and_is_released(pack):
    heap = pack.nodes.heap
    with heap.kept_heap() as outer:
        assert outer == heap.available()
        with heap.kept_heap() as inner:
            assert inner == outer and heap._depth == (2 if outer else 0)
            block = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # a large block from the heap
            del block
    assert heap._depth == 0
    with heap.kept_heap(enabled=False) as off:
        assert off is False
