"""Progress inside a model call and cancelling between its modules (the engine's hooks), and the pack's
model-info route and error names (what the front end shows)."""

from __future__ import annotations

import contextvars
import os
import threading
import time

import pytest
import torch
from spandrel import ImageModelDescriptor
from spandrel.architectures.Compact import Compact

from packutil import pack  # noqa: F401  (session fixture)


@pytest.fixture
def engine(pack):
    return pack.nodes.engine


@pytest.fixture
def watch(pack, monkeypatch):
    module = pack.nodes.watch
    monkeypatch.setattr(module, "REPORT_EVERY", 0.0)  # every finished module reports (no clock in tests)
    monkeypatch.setattr(module, "CHECK_EVERY", 0.0)
    return module


def compact(pack, num_conv=6):
    module = Compact(num_feat=8, num_conv=num_conv, upscale=2).eval()
    return pack.archs.load_model(module.state_dict())


class Trip(torch.nn.Module):
    """Runs ``inner``; on its ``at``-th call, calls ``action`` first (a user pressing Cancel mid-model)."""

    def __init__(self, inner, action, at=1):
        super().__init__()
        self.inner, self.action, self.at, self.calls = inner, action, at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            self.action()
        return self.inner(x)


def with_body(model, index, wrap):
    """``model`` (Compact) with body module ``index`` wrapped by ``wrap(module)``."""
    body = model.model.body
    body[index] = wrap(body[index])
    return model


def test_progress_moves_inside_a_single_model_call(pack, engine, watch):
    model = compact(pack)
    seen = []
    out, report = engine.upscale_image(model, torch.rand(1, 40, 40, 3), device="cpu",
                                       progress=lambda done, total: seen.append((done, total)))
    assert report.model_calls == 1 and report.tiles == 1
    total = seen[-1][1]
    inside = [d for d, _ in seen if 0 < d < total]
    assert len(inside) >= 5, f"only {len(inside)} updates inside the one model call"
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:])) and seen[-1][0] == total
    assert out.shape == (1, 80, 80, 3)


@pytest.mark.parametrize("family", ["flexnet", "lmlt", "lamnet", "eimn", "transformer"])
def test_a_one_tile_run_rises_smoothly_to_the_end_for_every_family(pack, engine, watch, family):
    """Inference forms fire few of their modules' hooks (EIMN: 20 of 384): the watch counts what the model
    really fires (a probe before the first call), so the bar climbs to ~100% inside the one call instead of
    stalling at a few percent and jumping at the end; a second run knows the count from the first."""
    import crafted

    torch.manual_seed(0)
    model = pack.archs.load_model(crafted.state_dicts()[family])
    for attempt in range(2):
        seen = []
        engine.upscale_image(model, torch.rand(1, 48, 40, 3), device="cpu", progress=lambda d, t: seen.append((d, t)))
        total = seen[-1][1]
        inside = [d / total for d, t in seen if d < total]
        assert inside and max(inside) >= 0.75, f"{family}, run {attempt + 1}: the bar reached {max(inside or [0]):.0%}"
        assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:])) and len(inside) >= 4
        assert sum(b - a > 0.3 for a, b in zip([0.0, *inside], [*inside, 1.0])) == 0, "a jump of > 30%"


def test_later_calls_report_fractions_from_the_first_calls_count(pack, watch):
    fractions = []
    module = Compact(num_feat=4, num_conv=4, upscale=2).eval()
    w = watch.ModuleWatch(module, on_fraction=fractions.append)
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode(), w.attached():
        with w.call(x.shape):
            module(x)
        first = list(fractions)
        fractions.clear()
        with w.call(x.shape):
            module(x)
    assert fractions == sorted(fractions) and 0.9 <= fractions[-1] <= watch.MAX_FRACTION
    assert len(first) == len(fractions) == w.learned[x.shape]
    assert not any(m._forward_hooks for m in module.modules()), "no hook is left behind"


def test_reports_and_checks_follow_the_clock(pack):
    watch = pack.nodes.watch
    now = [0.0]

    class Tick(torch.nn.Module):  # each module "takes" a quarter second
        def forward(self, x):
            now[0] += 0.25
            return x

    module = torch.nn.Sequential(*[Tick() for _ in range(10)])
    fractions, checks = [], []
    w = watch.ModuleWatch(module, check_cancel=lambda: checks.append(now[0]), on_fraction=fractions.append,
                          report_every=1.0, check_every=0.1, clock=lambda: now[0])
    with w.attached(), w.call("x"):
        module(torch.zeros(1))
    # 11 modules finish: 10 ticks 0.25 s apart (each checks), then the Sequential at the same moment as its
    # last tick (no second check); a report at 1.0 s and 2.0 s
    assert checks == [0.25 * i for i in range(1, 11)]
    assert len(fractions) == 2 and fractions == sorted(fractions)


class Slow(torch.nn.Module):
    """A module that sits in one native call for ``seconds`` (as one large convolution does)."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def slow_model(seconds=0.6, fast=4):
    return torch.nn.Sequential(*[torch.nn.Identity() for _ in range(fast)], Slow(seconds), torch.nn.Identity())


def test_progress_moves_while_one_long_module_runs(pack):
    """A hook cannot split a module that runs for seconds: the ticker reports between two fires, rising, and
    never past the mark of the fire that has not come."""
    watch = pack.nodes.watch
    module = slow_model()
    fractions = []
    w = watch.ModuleWatch(module, on_fraction=fractions.append, report_every=0.05)
    w.learned[(1, 1, 1, 1)] = 8  # 8 fires expected: 4 fast, the slow one, the last, the Sequential
    with w.attached(), w.call((1, 1, 1, 1)):
        module(torch.zeros(1))
    inside_slow = [f for f in fractions if 4 / 8 < f < 5 / 8]
    assert w.ticks >= 5 and len(set(inside_slow)) >= 5, fractions  # rising all through the long module
    assert fractions == sorted(fractions) and max(fractions) <= watch.MAX_FRACTION
    assert not any(m._forward_hooks for m in module.modules())


def test_a_compiled_call_without_hooks_still_shows_progress(pack):
    """No hooks (a compiled model): the whole call is one step, estimated from the length it took before."""
    watch = pack.nodes.watch
    module = Slow(0.4)
    fractions = []
    w = watch.ModuleWatch(module, on_fraction=fractions.append, report_every=0.05)
    with w.call((1, 1, 1, 1)):
        module(torch.zeros(1))
    assert w.learned[("seconds", (1, 1, 1, 1))] >= 0.4
    fractions.clear()
    with w.call((1, 1, 1, 1)):
        module(torch.zeros(1))
    assert len(fractions) >= 4 and fractions == sorted(fractions) and 0.3 < fractions[-1] < 1.0, fractions


def test_a_cancel_raised_in_a_progress_report_reaches_the_model_thread(pack):
    """ComfyUI's progress hook checks for Cancel and clears the flag as it raises: raised in the ticker's
    thread, the exception is raised again in the model's thread at the next hook, and the rest never runs."""
    watch = pack.nodes.watch

    class InterruptProcessingException(Exception):
        pass

    def report(fraction):
        if fractions:
            raise InterruptProcessingException()
        fractions.append(fraction)

    fractions, after = [], []
    module = slow_model(seconds=0.4)
    module[-1].register_forward_hook(lambda *a: after.append(1))
    w = watch.ModuleWatch(module, on_fraction=report, report_every=0.05)
    with pytest.raises(InterruptProcessingException):
        with w.attached(), w.call((1, 1, 1, 1)):
            module(torch.zeros(1))
    assert fractions and after == [], "the module after the cancel did not run"


def test_the_ticker_reports_in_the_callers_context(pack):
    """ComfyUI finds the running node from a context variable: the ticker's reports see the caller's."""
    watch = pack.nodes.watch
    node = contextvars.ContextVar("node", default=None)
    seen = []
    node.set("7")
    w = watch.ModuleWatch(Slow(0.3), on_fraction=lambda f: seen.append((node.get(), threading.current_thread().name)),
                          report_every=0.05)
    with w.call((1, 1, 1, 1)):
        w.module(torch.zeros(1))
    assert seen and all(n == "7" for n, _ in seen)
    assert any(t != threading.current_thread().name for _, t in seen), "reports came from the ticker"


def test_cancel_takes_effect_between_modules_inside_the_model_call(pack, engine, watch):
    host = pack.nodes.host
    model = compact(pack)
    engine.upscale_image(model, torch.rand(1, 8, 8, 3), device="cpu", progress=lambda d, t: None)  # the probe ran
    last = model.model.body[-1]
    ran_after = []
    last.register_forward_hook(lambda *a: ran_after.append(1))
    with_body(model, 3, lambda m: Trip(m, host.request_interrupt))
    with pytest.raises(host.Interrupted):
        engine.upscale_image(model, torch.rand(1, 32, 32, 3), tile_size=32, device="cpu")  # no memory probe
    assert ran_after == [], "the modules after the cancel did not run"
    out, _ = engine.upscale_image(model, torch.rand(1, 8, 8, 3), device="cpu")  # the flag was consumed
    assert out.shape == (1, 16, 16, 3)
    assert not any(m._forward_hooks for m in model.model.modules() if m is not last)


def test_cancel_inside_comfyui_raises_its_own_exception_mid_model(pack, engine, watch):
    """The engine's cancel callback is whatever the host gives: ComfyUI's check raises its exception type."""

    class InterruptProcessingException(Exception):
        pass

    pressed = {"flag": False}

    def check():
        if pressed["flag"]:
            raise InterruptProcessingException()

    model = compact(pack)
    engine.upscale_image(model, torch.rand(1, 8, 8, 3), device="cpu", progress=lambda d, t: None)  # the probe ran
    model = with_body(model, 2, lambda m: Trip(m, lambda: pressed.update(flag=True)))
    with pytest.raises(InterruptProcessingException):
        engine.upscale_image(model, torch.rand(1, 32, 32, 3), tile_size=32, device="cpu", check_cancel=check)


class NoHooks(torch.nn.Module):
    """A module that refuses forward hooks (as scripted modules do)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)

    def register_forward_hook(self, *args, **kwargs):
        raise RuntimeError("no hooks here")


def test_a_model_that_refuses_hooks_still_runs(pack, engine, watch):
    base = compact(pack)
    module = NoHooks(base.model)
    model = ImageModelDescriptor(module, module.state_dict(), architecture=base.architecture, purpose="SR",
                                 tags=[], supports_half=False, supports_bfloat16=False, scale=2, input_channels=3,
                                 output_channels=3)
    seen = []
    out, _ = engine.upscale_image(model, torch.rand(1, 16, 16, 3), device="cpu",
                                  progress=lambda d, t: seen.append((d, t)))
    assert out.shape == (1, 32, 32, 3) and seen[-1][0] == seen[-1][1]
    assert not any(m._forward_hooks for m in module.modules())


# --------------------------------------------------------------------------------------------------
# What the front end asks and shows


def test_model_info_route_replies(pack, tmp_path, monkeypatch):
    host, model_io = pack.nodes.host, pack.nodes.model_io
    monkeypatch.setenv("FLEXSR_UPSCALE_MODELS", str(tmp_path))
    torch.save(Compact(num_feat=4, num_conv=1, upscale=2).state_dict(), tmp_path / "tiny.pth")
    (tmp_path / "broken.pth").write_bytes(b"nope")
    status, body = host.model_info_reply("tiny.pth", model_io.describe_file)
    assert status == 200 and body["info"].startswith("architecture: ") and "scale: 2×" in body["info"]
    status, body = host.model_info_reply("broken.pth", model_io.describe_file)
    assert status == 422 and body["type"] and "." not in body["type"] and body["error"]
    assert host.model_info_reply("missing.pth", model_io.describe_file)[0] == 404
    assert host.model_info_reply("../tiny.pth", model_io.describe_file)[0] == 404
    assert host.model_info_reply("", model_io.describe_file)[0] == 400


def test_model_descriptions_are_cached_per_file_version(pack, tmp_path, monkeypatch):
    model_io = pack.nodes.model_io
    path = tmp_path / "m.pth"
    torch.save(Compact(num_feat=4, num_conv=1, upscale=2).state_dict(), path)
    loads = []
    real = model_io.load
    monkeypatch.setattr(model_io, "load", lambda p: loads.append(p) or real(p))
    first = model_io.describe_file(path)
    assert model_io.describe_file(path) == first and len(loads) == 1
    torch.save(Compact(num_feat=4, num_conv=1, upscale=4).state_dict(), path)
    os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    second = model_io.describe_file(path)
    assert len(loads) == 2 and "scale: 4×" in second and "scale: 2×" in first
    # a file that fails is cached too: asking again raises the same error without reading it again
    path.write_bytes(b"\x80\x02" + b"]" * 100_000)
    os.utime(path, ns=(2, 2))
    for _ in range(3):
        with pytest.raises(pack.archs.FlexSRError):
            model_io.describe_file(path)
    assert len(loads) == 3


def test_a_models_stated_use_comes_first_in_its_description(pack, tmp_path):
    from safetensors.torch import save_file

    model_io = pack.nodes.model_io
    sd = Compact(num_feat=4, num_conv=1, upscale=2).state_dict()
    save_file(dict(sd), str(tmp_path / "m.safetensors"), metadata={model_io.META_USE: "JPEG'd drawn art"})
    save_file(dict(sd), str(tmp_path / "plain.safetensors"))
    assert model_io.describe_file(tmp_path / "m.safetensors").startswith("for: JPEG'd drawn art\narchitecture:")
    assert model_io.describe_file(tmp_path / "plain.safetensors").startswith("architecture:")


def test_descriptions_name_an_architecture_once(pack):
    describe = pack.nodes.model_io.describe
    shipped = pack.archs.load_model(pack.nodes.host.PACK_MODELS / "FlexSR_default_x2.safetensors")
    assert describe(shipped).splitlines()[0] == "architecture: FlexNet"  # not "FlexNet (FlexNet)"
    assert describe(compact(pack)).splitlines()[0] == "architecture: RealESRGAN Compact (Compact)"


def test_error_reports_name_the_class_not_the_folder(pack):
    """ComfyUI shows ``<module>.<class>``; the pack's module is named after its folder's full path."""

    folder_module = "/home/me/ComfyUI/custom_nodes/FlexSR.archs.errors"
    Base = type("Base", (Exception,), {"__module__": folder_module})
    Child = type("Child", (Base,), {"__module__": folder_module})
    Grandchild = type("Grandchild", (Child,), {"__module__": folder_module})
    pack.nodes.host.short_error_names(Base)

    def full_type_name(klass):  # as ComfyUI's execution.py names an exception's type
        return klass.__qualname__ if klass.__module__ == "builtins" else klass.__module__ + "." + klass.__qualname__

    assert [full_type_name(c) for c in (Base, Child, Grandchild)] == ["Base", "Child", "Grandchild"]


def test_route_is_added_to_comfyuis_server(pack, tmp_path, monkeypatch):
    """``register_routes`` against stand-ins of ComfyUI's ``server.PromptServer`` and aiohttp's ``web``."""
    import asyncio
    import sys
    import types

    host, model_io = pack.nodes.host, pack.nodes.model_io
    monkeypatch.setenv("FLEXSR_UPSCALE_MODELS", str(tmp_path))
    torch.save(Compact(num_feat=4, num_conv=1, upscale=2).state_dict(), tmp_path / "tiny.pth")
    routes = {}

    class RouteTable:
        def get(self, path):
            def add(handler):
                routes[path] = handler
                return handler
            return add

    server = types.ModuleType("server")
    server.PromptServer = type("PromptServer", (), {"instance": types.SimpleNamespace(routes=RouteTable())})
    web = types.ModuleType("aiohttp.web")
    web.json_response = lambda body, status=200: (status, body)
    aiohttp = types.ModuleType("aiohttp")
    aiohttp.web = web
    monkeypatch.setitem(sys.modules, "server", server)
    monkeypatch.setitem(sys.modules, "aiohttp", aiohttp)
    monkeypatch.setitem(sys.modules, "aiohttp.web", web)
    host.forget_host()
    try:
        assert host.register_routes(model_io.describe_file)
        handler = routes[host.MODEL_INFO_ROUTE]
        request = types.SimpleNamespace(rel_url=types.SimpleNamespace(query={"name": "tiny.pth"}))
        status, body = asyncio.run(handler(request))
        assert status == 200 and body["info"] == model_io.describe_file(tmp_path / "tiny.pth")
        request.rel_url.query = {"name": "nope.pth"}
        assert asyncio.run(handler(request))[0] == 404
        # the last report of a node, for a page that has none kept (a new tab)
        reports = routes[host.REPORT_ROUTE]
        host.keep_report("12", "4 tiles × 64×64 px")
        request.rel_url.query = {"node": "12"}
        assert asyncio.run(reports(request)) == (200, {"node": "12", "report": "4 tiles × 64×64 px"})
        request.rel_url.query = {"node": "13"}
        assert asyncio.run(reports(request))[0] == 404
        request.rel_url.query = {}
        assert asyncio.run(reports(request))[0] == 400
    finally:
        host.forget_host()


def test_no_route_outside_comfyui(pack):
    pack.nodes.host.forget_host()
    assert pack.nodes.host.register_routes(pack.nodes.model_io.describe_file) is False
