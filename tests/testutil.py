"""Test helpers in spandrel's manner: round-trip random models through state dicts and files."""

from __future__ import annotations

import io
from typing import Callable

import safetensors.torch
import torch
from spandrel import ArchRegistry

import archs


def assert_same_hyperparameters(a: torch.nn.Module, b: torch.nn.Module, ignore: set[str] = frozenset()) -> None:
    assert type(a) is type(b), f"loaded a {type(b).__name__}, expected {type(a).__name__}"
    ha = {k: v for k, v in a.hyperparameters.items() if k not in ignore}
    hb = {k: v for k, v in b.hyperparameters.items() if k not in ignore}
    norm = lambda d: {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}  # noqa: E731
    assert norm(ha) == norm(hb), f"hyperparameters differ:\n built:  {ha}\n loaded: {hb}"


def assert_round_trip(
    make_model: Callable[[], torch.nn.Module],
    input_size: tuple[int, int] = (12, 10),
    registry: ArchRegistry | None = None,
    ignore: set[str] = frozenset(),
    atol: float = 1e-5,
    check_safetensors: bool = True,
) -> None:
    """random model -> state dict -> detect -> load -> same hyperparameters -> same output.

    Also through a .safetensors byte round trip, and through ``archs.load_model`` (which also
    sees spandrel's built-ins, so a collision with one of them would show up here).
    """
    registry = registry or archs.REGISTRY
    model = make_model().eval()
    sd = model.state_dict()
    detected = [s.architecture.id for s in registry.architectures("detection") if s.detect(sd)]
    assert detected, f"no architecture detects {type(model).__name__}"
    sources = {"state dict": dict(sd)}
    if check_safetensors:
        sources["safetensors"] = safetensors.torch.load(safetensors.torch.save(_contiguous(sd)))
    want = None
    for how, state in sources.items():
        desc = archs.load_model(state)
        if want is None:
            x = torch.rand(1, desc.input_channels, *input_size)
            with torch.no_grad():
                want = model(x)
        assert_same_hyperparameters(model, desc.model, ignore)
        with torch.no_grad():
            got = desc.model(x)
        assert got.shape == want.shape, how
        assert torch.allclose(got, want, atol=atol), f"{how}: max diff {(got - want).abs().max():.3g}"


def _contiguous(sd: dict) -> dict:
    return {k: v.contiguous() for k, v in sd.items()}


def torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def spandrel_builtins(order: str = "detection") -> list:
    """spandrel's own architectures (``MAIN_REGISTRY`` less anything ``archs.install()`` added to it).

    Loading the pack (as ComfyUI does, and as the node tests do) installs FlexSR's families into
    spandrel's global registry; "no built-in claims ours" must look at the built-ins only.
    """
    from spandrel import MAIN_REGISTRY

    ours = {s.architecture.id for s in archs.REGISTRY.architectures("insertion")}
    return [s for s in MAIN_REGISTRY.architectures(order) if s.architecture.id not in ours]


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move every float weight a little off its initialisation, so branches and gammas all matter."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for k, v in sd.items():
        if v.dtype.is_floating_point and not k.endswith("init_pos"):
            sd[k] = v + 0.05 * torch.randn(v.shape, generator=g)
    model.load_state_dict(sd)
    return model
