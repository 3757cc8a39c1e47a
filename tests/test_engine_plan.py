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


def test_an_image_off_the_models_grid_still_runs_as_one_call(pack):
    """480x492 with an 8 px grid: one call (the model pads itself), not two tiles of 488 + 4."""
    from archs.flexnet import FlexNet

    engine = pack.nodes.engine
    model = pack.archs.load_model(FlexNet(dim=8, num_blocks=(1,), window_size=8, hidden_rate=1, scale=2).state_dict())
    assert engine.grid_unit(model) == 8
    shapes = []
    model.model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    for h, w in ((60, 123), (37, 44), (5, 3)):
        shapes.clear()
        # fp32 named: "auto" may first time bf16 against fp32 on a CPU that has it, which is not the plan under test
        out, report = engine.upscale_image(model, torch.rand(1, h, w, 3), device="cpu", precision="fp32")
        assert out.shape == (1, 2 * h, 2 * w, 3) and report.tiles == 1, report.text()
        assert shapes == [(1, 3, h, w)]


def test_a_tiled_cpu_run_keeps_its_working_set_small_and_probes_once(pack, monkeypatch):
    engine = pack.nodes.engine
    monkeypatch.setattr(engine, "CPU_WORKSET", 8 << 20)  # the image does not fit whole
    monkeypatch.setattr(engine, "CPU_TILED_FLOOR", 4 << 20)
    monkeypatch.setattr(engine, "CPU_EFFICIENT_TILE", 16)
    monkeypatch.setattr(engine, "CPU_CONTEXT_RATIO", 0)
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
    monkeypatch.setattr(engine, "CPU_CONTEXT_RATIO", 0)
    monkeypatch.setattr(engine, "CPU_WORKSET", 8 << 30)
    monkeypatch.setattr(engine.host, "available_ram", lambda: 64 << 30)
    image = torch.rand(1, 400, 400, 3)
    _, report = engine.upscale_image(model, image, device="cpu")
    assert report.tiles > 1 and report.tile >= 96, report.plan
    monkeypatch.setattr(engine, "CPU_EFFICIENT_TILE", 0)  # without the floor the same model gets small tiles
    _, small = engine.upscale_image(model, image, device="cpu")
    assert small.tile < report.tile, (small.plan, report.plan)
    # for a costly model (many parameters: many multiply-adds per pixel) the floor also grows with the
    # context (tiles of CPU_CONTEXT_RATIO x context), so the context's share of the work stays small
    monkeypatch.setattr(engine, "CPU_CONTEXT_RATIO", 4)
    monkeypatch.setattr(engine, "CPU_WORKSET", 20 << 30)  # room for the larger floor; the image still does not fit
    monkeypatch.setattr(engine, "CPU_COSTLY_PARAMS", engine.parameter_count(model) + 1)  # cheap: no such floor
    _, cheap = engine.upscale_image(model, image, device="cpu", overlap=32)
    assert cheap.tile < 4 * 32, cheap.plan
    monkeypatch.setattr(engine, "CPU_COSTLY_PARAMS", engine.parameter_count(model))
    _, ratio = engine.upscale_image(model, image, device="cpu", overlap=32)
    assert ratio.context == 32 and ratio.tiles > 1 and ratio.tile >= 4 * 32, ratio.plan
    _, wider = engine.upscale_image(model, image, device="cpu", overlap=48)
    assert wider.context == 48 and wider.tile >= 4 * 48 > ratio.tile, (wider.plan, ratio.plan)


def test_auto_precision_on_cpu_measures_bf16_once_per_network_and_machine(pack, monkeypatch, tmp_path):
    engine, choices = pack.nodes.engine, pack.nodes.choices
    monkeypatch.setattr(choices, "_memory", {})
    monkeypatch.setenv("FLEXSR_COMPILE_CACHE", str(tmp_path / "cache" / "torch_compile"))
    cpu = torch.device("cpu")
    flexnet = pack.archs.load_model(pack.archs.FlexNet(dim=8, num_blocks=(1,)).state_dict())
    compact, _ = counting_model(pack)
    compact.supports_bfloat16 = True
    measured = []
    results = {"FlexNet": {"pays": True, "speedup": 1.6, "psnr_db": 50.0},
               "Compact": {"pays": False, "speedup": 0.7, "psnr_db": 60.0}}

    def fake(model, x):
        measured.append(model.architecture.id)
        return results[model.architecture.id]

    monkeypatch.setattr(choices.bf16_pays, "__defaults__", (None, fake))
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    img = torch.rand(1, 40, 30, 3)
    assert engine.resolve_precision("auto", flexnet, cpu, img) == torch.bfloat16
    assert engine.resolve_precision("auto", compact, cpu, img) == torch.float32
    assert engine.resolve_precision("auto", flexnet, cpu, img) == torch.bfloat16 and measured == ["FlexNet", "Compact"]
    assert engine.resolve_precision("fp32", flexnet, cpu, img) == torch.float32
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)  # no native bf16: fp32, nothing measured
    other = pack.archs.load_model(pack.archs.FlexNet(dim=12, num_blocks=(1,)).state_dict())
    assert engine.resolve_precision("auto", other, cpu, img) == torch.float32 and len(measured) == 2


def test_the_bf16_measurement_compares_speed_and_output(pack):
    """The real measurement on a tiny network: both figures, and a decision that follows the thresholds."""
    choices = pack.nodes.choices
    model = pack.archs.load_model(pack.archs.FlexNet(dim=8, num_blocks=(1,)).state_dict())
    x = choices.probe_input(torch.rand(1, 20, 100, 3), 3)
    assert x.shape == (1, 3, 64, 64)
    got = choices.measure_bf16(model, x)
    assert got["speedup"] > 0 and 20 < got["psnr_db"] <= 99
    assert got["pays"] == (got["speedup"] >= choices.BF16_MIN_SPEEDUP and got["psnr_db"] >= choices.BF16_MIN_PSNR)


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


def test_run_on_heap_returns_raises_and_carries_context(pack):
    import contextvars
    import threading

    heap = pack.nodes.heap
    var = contextvars.ContextVar("flexsr_test_var", default="unset")
    var.set("caller's")
    seen = heap.run_on_heap(lambda: (var.get(), threading.current_thread().name))
    assert seen[0] == "caller's"
    assert seen[1].startswith("flexsr-heap") == heap.available()

    def fails():
        raise KeyError("from the heap thread")

    try:
        heap.run_on_heap(fails)
    except KeyError as e:
        assert "from the heap thread" in str(e)
    else:
        raise AssertionError("the heap thread's exception did not reach the caller")
    assert heap.run_on_heap(lambda: heap.run_on_heap(lambda: 7)) == 7  # nested: runs in place, no deadlock
    assert heap.heap_thread_on_main_arena() in ((True, False) if heap.available() else (None,))


def test_cpu_model_calls_run_in_the_heap_thread_with_the_callers_torch_state(pack):
    import threading

    engine, heap = pack.nodes.engine, pack.nodes.heap
    model, module = counting_model(pack)
    states = []
    module.register_forward_pre_hook(lambda m, args: states.append(
        (threading.current_thread().name, torch.is_inference_mode_enabled(), torch.get_num_threads())))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        image = torch.rand(1, 40, 56, 3)
        out, _ = engine.upscale_image(model, image, device="cpu")
        calls = list(states)
        with torch.inference_mode():
            want = model(image.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, want)
    assert len(calls) == 1
    name, inference, n = calls[0]
    assert name.startswith("flexsr-heap") == heap.available() and inference and n == 1


FAULTS_SCRIPT = r"""
import resource, sys, threading, json
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
result = {}

def worker():  # like ComfyUI's prompt worker: a thread with an arena of its own before the pack runs
    keep = [torch.empty(1 << 20, dtype=torch.uint8) for _ in range(4)]
    from packutil import load_pack
    from spandrel import ImageModelDescriptor
    from spandrel.architectures.Compact import Compact
    pack = load_pack()
    engine, heap = pack.nodes.engine, pack.nodes.heap
    layers = [torch.nn.Conv2d(3, 64, 1)]
    for _ in range(10):  # 21 activations of 64 MiB each (64 channels of 512², fp32), at most ~3 alive at once
        layers += [torch.nn.Conv2d(64, 64, 3, padding=1, groups=64), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Conv2d(64, 12, 1), torch.nn.PixelShuffle(2)).eval()
    base = pack.archs.load_model(Compact(num_feat=8, num_conv=1, upscale=2).state_dict())
    model = ImageModelDescriptor(net, net.state_dict(), architecture=base.architecture, purpose=base.purpose,
                                 tags=[], supports_half=False, supports_bfloat16=False, scale=2,
                                 input_channels=3, output_channels=3)
    image = torch.rand(1, 512, 512, 3)
    for name, direct in (("in this thread", True), ("in the heap thread", False)):
        saved = engine.run_on_heap
        if direct:
            engine.run_on_heap = lambda fn: fn()
        try:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            engine.upscale_image(model, image, device="cpu", tile_size=512)
            result[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        finally:
            engine.run_on_heap = saved
    result["main arena"] = heap.heap_thread_on_main_arena()

t = threading.Thread(target=worker)
t.start()
t.join()
print(json.dumps(result))
"""


def test_a_worker_threads_large_activations_are_not_faulted_in_again(pack):
    """ComfyUI runs nodes in a worker thread with an arena of its own, where glibc mmaps (and page-faults
    in) every block above 64 MiB. The engine's model calls run in the heap thread on the main arena, whose
    kept heap serves a run's activations again without faulting them in layer after layer."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    if not pack.nodes.heap.available():
        pytest.skip("needs glibc")
    tests = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, str(tests)], capture_output=True, text=True,
                          timeout=300, cwd=tests)
    assert done.returncode == 0, done.stderr[-3000:]
    faults = json.loads(done.stdout.strip().splitlines()[-1])
    if not faults["main arena"]:
        pytest.skip(f"the heap thread did not get glibc's main arena here: {faults}")
    activation = (64 << 20) // 4096  # pages of one activation
    assert faults["in this thread"] > 10 * activation, faults  # the case being fixed: 20 activations faulted in
    # the heap's first growth to the run's peak (a few activations, the input and output) is faulted in once
    assert faults["in the heap thread"] < 8 * activation, faults
