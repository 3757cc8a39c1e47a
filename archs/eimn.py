"""EIMN: Efficient Information Modulation Network for image super-resolution (Liu et al., ECAI 2023).

Parameter and module names follow the authors' implementation (liux520/EIMN, ``Model/EIMN.py``), so
the released checkpoints (plain state dicts) load with strict key matching and give the same outputs.

Network, on ``[B, 3, H, W]`` images in 0..1::

    f = head(x)                                     # conv3x3, 3 -> embed_dims
    y = f
    for each stage i = 1..num_stages:               # ``block{i}`` (depths blocks) then ``norm{i}``
        for each EIMNBlock:
            y = y + layer_scale_1 * MOLRCM(BatchNorm(y))   # multi-order long-range conv modulation
            y = y + layer_scale_2 * SADFFM(BatchNorm(y))   # spatially-aware dual-gated FFN
        y = LayerNorm over channels(y)
    out = PixelShuffle(conv3x3(f + y))              # ``tail``: embed_dims -> 3*scale^2 -> [B, 3, sH, sW]

Everything is convolutional with zero padding and no down-sampling, so any input size down to 1x1
works as is (no internal padding needed) and gives the reference's numbers. BatchNorm layers use
their running statistics in eval mode (the descriptor returned by the loader is in eval mode).

Inference form: in eval mode without autograd, on float32 CPU tensors (no autocast), ``forward`` runs
:meth:`EIMN._infer`: channels-last tokens ``[B*H*W, C]`` from head to tail (the reference graph leaves
each stage's output channels-last, so its convs switch layouts), every 1x1 conv a oneDNN matmul
(:mod:`archs.onednn`) with its GELU / SiLU / residual add fused, each BatchNorm folded into the 1x1
convs that read it and each layer scale into its branch's last weights (cached by
:func:`archs.reparam.derived`, so they follow every weight change), SADFFM's wide part in row bands
with its GELU gate fused into the depthwise convs, the dilated depthwise convs as undilated ones over
sub-grids. Same numbers as the reference graph to ~1e-6; training and state dicts are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from spandrel import ImageModelDescriptor
from spandrel.util import KeyCondition, get_scale_and_output_channels, store_hyperparameters
from torch import Tensor, nn

from . import onednn
from .errors import IncompatibleWeightsError
from .registry import FlexSRArchitecture
from .reparam import derived, inference_path

#: The published configurations; the preset functions below and the descriptor's tags read these.
PRESETS: dict[str, dict[str, object]] = {
    "EIMN_L": {"embed_dims": 64, "num_stages": 16, "depths": 1, "mlp_ratios": 2.66},
    "EIMN_A": {"embed_dims": 64, "num_stages": 14, "depths": 1, "mlp_ratios": 2.66},
}


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop whole samples of a residual branch with probability ``p``."""
    if p <= 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


def molrcm_split(dim: int) -> tuple[int, int, int]:
    """Channel groups of MOLRCM's query: (dilated 5x5, identity, dilated 7x7) = (3/8, 1/8, the rest).

    The reference takes ``int(dim/2)`` for the last group, which only adds up when ``dim`` is a
    multiple of 8 (any other width crashes there); taking the remainder is the same wherever the
    reference runs.
    """
    c1, c2 = int(3 / 8 * dim), int(1 / 8 * dim)
    return c1, c2, dim - c1 - c2


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of ``[B, C, H, W]`` (biased variance, eps 1e-6), weight and bias ``[C]``.

    Half-precision inputs are normalised in float32 and returned in their own dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):
            # Features reach ~1e3 in the released models: their squares overflow float16 (and lose
            # precision in bfloat16), so the statistics are taken in float32.
            x = x.float()
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return (self.weight[:, None, None] * x + self.bias[:, None, None]).to(dtype)


class DFFM(nn.Module):
    """Dynamic feature fusion: ``x * sigmoid(channel gate) * sigmoid(spatial gate)`` on ``[B, C, H, W]``.

    The channel gate comes from the globally pooled, channel-normed input; the spatial gate from the
    per-pixel reduced features concatenated with the (broadcast) global ones.
    """

    def __init__(self, dim: int, act_ratio: float = 0.25):
        super().__init__()
        reduced = int(dim * act_ratio)
        self.norm = ChannelLayerNorm(dim)
        self.global_reduce = nn.Conv2d(dim, reduced, 1)
        self.local_reduce = nn.Conv2d(dim, reduced, 1)
        self.channel_expand = nn.Conv2d(reduced, dim, 1)
        self.spatial_expand = nn.Conv2d(reduced * 2, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        normed = self.norm(x)
        x_global = F.gelu(self.global_reduce(normed.mean(dim=(2, 3), keepdim=True)))  # [B, r, 1, 1]
        x_local = F.gelu(self.local_reduce(normed))  # [B, r, H, W]
        channel_gate = torch.sigmoid(self.channel_expand(x_global))  # [B, C, 1, 1]
        both = torch.cat([x_local, x_global.expand(-1, -1, *x_local.shape[-2:])], dim=1)
        spatial_gate = torch.sigmoid(self.spatial_expand(both))  # [B, 1, H, W]
        return x * (channel_gate * spatial_gate)

    def add_to_(self, y: Tensor, x: Tensor, b: int, scale: Tensor) -> None:
        """Inference: ``y += scale * DFFM(x)`` in place, ``y`` and ``x`` tokens ``[B*H*W, C]`` (``x`` is overwritten).

        The norm's weight and bias fold into both reduce convs; the gates are applied in place.
        """
        n, c = x.shape
        norm, r = self.norm, self.local_reduce.out_channels

        def fold():
            wl = self.local_reduce.weight.view(r, c)
            return (wl * norm.weight).contiguous(), self.local_reduce.bias + wl @ norm.bias

        wl, bl = derived(self, "local", [norm.weight, norm.bias, self.local_reduce.weight, self.local_reduce.bias], fold)
        normed = F.layer_norm(x, (c,), None, None, norm.eps)  # [N, C] without the affine part
        x_global = F.linear(normed.view(b, n // b, c).mean(1) * norm.weight + norm.bias,
                            self.global_reduce.weight.view(r, c), self.global_reduce.bias)
        x_global = F.gelu(x_global)  # [B, r]
        channel_gate = torch.sigmoid(F.linear(x_global, self.channel_expand.weight.view(c, r), self.channel_expand.bias))
        x_local = onednn.linear(normed, wl, bl, "gelu")  # [N, r]
        w_spatial = self.spatial_expand.weight.view(2 * r)
        per_image = x_global @ w_spatial[r:] + self.spatial_expand.bias  # [B]
        spatial_gate = (x_local.view(b, n // b, r) @ w_spatial[:r]).add_(per_image[:, None]).sigmoid_()
        x = x.view(b, n // b, c).mul_(spatial_gate[..., None])
        y.view(b, n // b, c).addcmul_(x, (channel_gate * scale)[:, None, :])


#: Inference: pixels per band of SADFFM's wide part (its activations are 2 * 170 channels wide, ~2 kB a
#: pixel). Each band recomputes the row above and below it, so short bands cost more: bands of 32768
#: pixels run EIMN_A 1.02-1.03x faster at 64² and 128² than bands of 2048, and 1.07x on a 768-wide
#: strip (where 2048 pixels are 8 rows: a quarter recomputed); keeping the band in cache gained nothing
#: (bench/bench_inference_bands.py).
FFN_CHUNK = 32768


class SADFFM(nn.Module):
    """Spatially-aware dual-gated feed-forward: 1x1 up to 2*hidden, depthwise 3x3 (``SAL``), GELU-gate,
    1x1 back to ``dim``, then :class:`DFFM`. ``hidden = int(dim * expand_ratio)``."""

    def __init__(self, dim: int, expand_ratio: float, bias: bool = True, drop: float = 0.0):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.linear_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.SAL = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.linear_out = nn.Conv2d(hidden, dim, 1, bias=bias)
        self.DFFM = DFFM(dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.SAL(self.linear_in(x)).chunk(2, dim=1)
        return self.drop(self.DFFM(self.linear_out(F.gelu(gate) * value)))

    def add_to_(self, y: Tensor, x: Tensor, size: tuple[int, int, int], w_in: Tensor, b_in: Tensor, scale: Tensor) -> None:
        """Inference: ``y += scale * SADFFM(x)``, tokens ``[B*H*W, C]``; ``w_in``/``b_in`` replace
        ``linear_in``'s weights (the block's BatchNorm folded in), as ``(gate half, value half)`` pairs.

        The wide part (``linear_in`` -> ``SAL`` -> gate -> ``linear_out``) runs in bands of about
        :data:`FFN_CHUNK` pixels, each with the row above and below it that ``SAL`` reads, so its
        activations (5.3x the width of the features) stay bounded on large tiles.
        """
        b, h, w = size
        hidden = self.linear_out.in_channels
        sal = self.SAL
        w_out = self.linear_out.weight.view(-1, hidden)
        w_sal = [sal.weight[:hidden], sal.weight[hidden:]]
        b_sal = [None, None] if sal.bias is None else [sal.bias[:hidden], sal.bias[hidden:]]
        out = torch.empty_like(x)
        for rows, inner, start in onednn.row_bands(b, h, w, FFN_CHUNK, 1):  # with the rows SAL reads
            band = x[rows]
            height = band.shape[0] // w
            gate, value = (onednn.image(onednn.linear(band, w_in[j], b_in[j]), 1, height, w) for j in (0, 1))
            gated = onednn.tokens(onednn.depthwise_gated(gate, value, w_sal[0], b_sal[0], w_sal[1], b_sal[1], 1))
            out[start : start + inner.stop - inner.start] = onednn.linear(gated[inner], w_out, self.linear_out.bias)
        self.DFFM.add_to_(y, out, b, scale)


class MOLRCM(nn.Module):
    """Multi-order long-range convolutional modulation on ``[B, dim, H, W]``.

    ``query = region(GELU(proj_query(x)))`` (depthwise 5x5); its channel groups (see
    :func:`molrcm_split`) go through a depthwise 5x5 dilated 2, nothing, and a depthwise 7x7
    dilated 3; ``out(SiLU(fusion(cat)) * proj_value(x))``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.split_c1, self.split_c2, self.split_c3 = molrcm_split(dim)
        c1, c3 = self.split_c1, self.split_c3
        self.region = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.spatial_1 = nn.Conv2d(c1, c1, 5, padding=4, dilation=2, groups=c1)
        self.spatial_2 = nn.Conv2d(c3, c3, 7, padding=9, dilation=3, groups=c3)
        self.fusion = nn.Conv2d(dim, dim, 1)
        self.proj_value = nn.Sequential(nn.Conv2d(dim, dim, 1))
        self.proj_query = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU())
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        value = self.proj_value(x)
        query = self.region(self.proj_query(x))
        q1, q2, q3 = query.split([self.split_c1, self.split_c2, self.split_c3], dim=1)
        query = torch.cat([self.spatial_1(q1), q2, self.spatial_2(q3)], dim=1)
        return self.out(F.silu(self.fusion(query)) * value)

    def add(self, y: Tensor, x: Tensor, size: tuple[int, int, int], weights) -> Tensor:
        """Inference: ``y + MOLRCM(x)`` as a new tensor, tokens ``[B*H*W, C]``; ``weights`` are
        ``(w_value, b_value, w_query, b_query, w_out, b_out)`` with the block's BatchNorm and layer
        scale folded in."""
        b, h, w = size
        wv, bv, wq, bq, wo, bo = weights
        c = x.shape[1]
        c1, c2 = self.split_c1, self.split_c2
        value = onednn.linear(x, wv, bv)
        region = onednn.depthwise_conv(onednn.image(onednn.linear(x, wq, bq, "gelu"), b, h, w), self.region)
        query = torch.empty_like(value)
        pixels = query.view(b, h, w, c)
        pixels[..., :c1].copy_(onednn.depthwise_conv(region[:, :c1], self.spatial_1).permute(0, 2, 3, 1))
        pixels[..., c1 : c1 + c2].copy_(region[:, c1 : c1 + c2].permute(0, 2, 3, 1))
        pixels[..., c1 + c2 :].copy_(onednn.depthwise_conv(region[:, c1 + c2 :], self.spatial_2).permute(0, 2, 3, 1))
        fused = onednn.linear(query, self.fusion.weight.view(c, c), self.fusion.bias, "swish").mul_(value)
        return onednn.linear_add(fused, y, wo, bo)


class EIMNBlock(nn.Module):
    """``x + ls1 * MOLRCM(norm1(x))``, then ``x + ls2 * SADFFM(norm2(x))`` on ``[B, dim, H, W]``."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        bias: bool = True,
        drop: float = 0.0,
        drop_path: float = 0.0,
        norm: type[nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = MOLRCM(dim)
        self.norm2 = norm(dim)
        self.mlp = SADFFM(dim, mlp_ratio, bias, drop)
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), 1e-2))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), 1e-2))
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        p, training = self.drop_path, self.training
        x = x + _drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)), p, training)
        x = x + _drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)), p, training)
        return x

    def folds(self) -> bool:
        """Whether the inference form applies: both norms are BatchNorm2d with running statistics."""
        return all(
            isinstance(n, nn.BatchNorm2d) and n.running_mean is not None and n.running_var is not None
            for n in (self.norm1, self.norm2)
        )

    def forward_tokens(self, y: Tensor, size: tuple[int, int, int]) -> Tensor:
        """Inference form of :meth:`forward` (eval, no autograd) on tokens ``[B*H*W, C]``; ``y`` is left
        alone, the result is a new tensor. Each BatchNorm folds into the 1x1 convs that read it, each
        layer scale into the last weights of its branch."""
        attn, mlp, c = self.attn, self.mlp, y.shape[1]
        bn1, bn2 = self.norm1, self.norm2

        def fold_attn():
            s, t = _bn_affine(bn1)
            wv, wq = attn.proj_value[0].weight.view(c, c), attn.proj_query[0].weight.view(c, c)
            ls = self.layer_scale_1
            return ((wv * s).contiguous(), attn.proj_value[0].bias + wv @ t,
                    (wq * s).contiguous(), attn.proj_query[0].bias + wq @ t,
                    (attn.out.weight.view(c, c) * ls[:, None]).contiguous(), attn.out.bias * ls)

        def fold_mlp():
            s, t = _bn_affine(bn2)
            w_in = mlp.linear_in.weight.view(-1, c)
            bias = w_in @ t if mlp.linear_in.bias is None else mlp.linear_in.bias + w_in @ t
            w = w_in * s
            hidden = mlp.linear_out.in_channels
            return (w[:hidden].contiguous(), w[hidden:].contiguous()), (bias[:hidden].contiguous(), bias[hidden:].contiguous())

        attn_sources = [bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, attn.proj_value[0].weight,
                        attn.proj_value[0].bias, attn.proj_query[0].weight, attn.proj_query[0].bias,
                        attn.out.weight, attn.out.bias, self.layer_scale_1]
        mlp_sources = [bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var, mlp.linear_in.weight, mlp.linear_in.bias]
        y = attn.add(y, y, size, derived(self, "attn", [t for t in attn_sources if t is not None], fold_attn))
        w_in, b_in = derived(self, "mlp", [t for t in mlp_sources if t is not None], fold_mlp)
        mlp.add_to_(y, y, size, w_in, b_in, self.layer_scale_2)
        return y


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(s, t)`` with ``bn(x) = x * s + t`` per channel (eval mode, running statistics)."""
    s = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight
    t = -bn.running_mean * s
    if bn.bias is not None:
        t = t + bn.bias
    return s, t


@store_hyperparameters()
class EIMN(nn.Module):
    """EIMN super-resolution network: ``[B, in_chans, H, W]`` in 0..1 -> ``[B, out_chans, H*scale, W*scale]``.

    Arguments keep the reference's names and defaults: ``embed_dims`` feature width (a multiple of 8
    in every published model), ``depths`` blocks per stage, ``mlp_ratios`` FFN expansion (hidden width
    ``int(embed_dims * mlp_ratios)``), ``num_stages`` stages (16 = EIMN_L, 14 = EIMN_A), ``norm`` the
    blocks' norm layer (the reference accepts but ignores it and always uses BatchNorm2d; here it is
    used, and the default is the same). ``freeze_param`` freezes everything but the tail, as the
    reference intends. ``in_chans``/``out_chans`` are FlexSR additions (the reference is RGB only).
    """

    hyperparameters: dict = {}

    def __init__(
        self,
        *,
        embed_dims: int = 64,
        scale: int = 2,
        depths: int = 1,
        mlp_ratios: float = 2.66,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        num_stages: int = 16,
        freeze_param: bool = False,
        norm: type[nn.Module] = nn.BatchNorm2d,
        in_chans: int = 3,
        out_chans: int = 3,
    ):
        super().__init__()
        if embed_dims < 4:
            raise ValueError(f"EIMN needs embed_dims >= 4 (got {embed_dims}).")
        if scale < 1 or num_stages < 1 or depths < 1:
            raise ValueError(f"scale, num_stages and depths must be >= 1 (got {scale}, {num_stages}, {depths}).")
        self.scale = scale
        self.num_stages = num_stages
        total = depths * num_stages
        rates = [float(r) for r in torch.linspace(0, drop_path_rate, total, device="cpu")]

        self.head = nn.Sequential(nn.Conv2d(in_chans, embed_dims, 3, padding=1))
        self.tail = nn.Sequential(
            nn.Conv2d(embed_dims, out_chans * scale * scale, 3, padding=1),
            nn.PixelShuffle(scale),
        )
        for i in range(num_stages):
            blocks = nn.ModuleList(
                EIMNBlock(embed_dims, mlp_ratios, drop=drop_rate, drop_path=rates[i * depths + j], norm=norm)
                for j in range(depths)
            )
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims))
        if freeze_param:
            self.freeze_body()

    def freeze_body(self) -> None:
        """Train only the tail (what the reference's ``freeze_param=True`` is meant to do)."""
        for name, param in self.named_parameters():
            param.requires_grad = name.startswith("tail.")

    def stages(self):
        """``(blocks, norm)`` of each stage, in order."""
        for i in range(1, self.num_stages + 1):
            yield getattr(self, f"block{i}"), getattr(self, f"norm{i}")

    def forward(self, x: Tensor) -> Tensor:
        if inference_path(self) and onednn.available(x) and all(b.folds() for blocks, _ in self.stages() for b in blocks):
            return self._infer(x)
        feat = self.head(x)
        y = feat
        for blocks, norm in self.stages():
            for block in blocks:
                y = block(y)
            y = norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over channels, channels-last
        return self.tail(feat + y)

    def _infer(self, x: Tensor) -> Tensor:
        """Inference form (eval, no autograd, float32 CPU): one channels-last token layout ``[B*H*W, C]``
        from head to tail, the 1x1 convs on oneDNN with their activation or residual add fused,
        BatchNorms and layer scales folded into neighbouring weights. Same numbers as :meth:`forward`."""
        b, _, h, w = x.shape
        feat = self.head(x.contiguous(memory_format=torch.channels_last))
        y = onednn.tokens(feat)
        for blocks, norm in self.stages():
            for block in blocks:
                y = block.forward_tokens(y, (b, h, w))
            y = F.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return self.tail(feat + onednn.image(y, b, h, w))


def EIMN_L(scale: int = 2, **overrides) -> EIMN:
    """EIMN_L (16 stages, width 64): 981,724 / 990,379 / 1,002,496 parameters at x2 / x3 / x4."""
    return EIMN(**{**PRESETS["EIMN_L"], "scale": scale, **overrides})


def EIMN_A(scale: int = 2, **overrides) -> EIMN:
    """EIMN_A (14 stages, width 64): 860,098 / 868,753 / 880,870 parameters at x2 / x3 / x4."""
    return EIMN(**{**PRESETS["EIMN_A"], "scale": scale, **overrides})


def mlp_ratio_for(embed_dims: int, hidden: int, default: float = 2.66) -> float:
    """A float ``r`` with ``int(embed_dims * r) == hidden`` (the default if it fits, else the plainest)."""
    for r in (default, hidden / embed_dims, (hidden + 0.5) / embed_dims):
        if int(embed_dims * r) == hidden:
            return r
    raise ValueError(f"no expansion ratio gives hidden width {hidden} at width {embed_dims}")  # unreachable


def _count(state_dict, pattern: str, start: int) -> int:
    n = start
    while pattern.format(n) in state_dict:
        n += 1
    return n - start


class EIMNArch(FlexSRArchitecture):
    """spandrel support for EIMN checkpoints (the authors' plain state dicts and FlexSR's own)."""

    def __init__(self) -> None:
        super().__init__(
            id="EIMN",
            name="EIMN",
            detect=KeyCondition.has_all(
                "head.0.weight",
                "tail.0.weight",
                "block1.0.layer_scale_1",
                "block1.0.layer_scale_2",
                "block1.0.norm1.weight",
                "block1.0.attn.region.weight",
                "block1.0.attn.spatial_1.weight",
                "block1.0.attn.spatial_2.weight",
                "block1.0.attn.proj_query.0.weight",
                "block1.0.mlp.linear_in.weight",
                "block1.0.mlp.SAL.weight",
                "block1.0.mlp.DFFM.spatial_expand.weight",
                "norm1.weight",
            ),
        )

    def load(self, state_dict) -> ImageModelDescriptor[EIMN]:
        if "block1.0.norm1.running_mean" not in state_dict:
            raise IncompatibleWeightsError(
                "EIMN checkpoint without BatchNorm statistics (block1.0.norm1.running_mean): only "
                "EIMN with BatchNorm2d blocks (every published model) is supported."
            )
        embed_dims, in_chans = state_dict["head.0.weight"].shape[:2]
        scale, out_chans = get_scale_and_output_channels(state_dict["tail.0.weight"].shape[0], in_chans)
        num_stages = _count(state_dict, "block{}.0.layer_scale_1", 1)
        depths = _count(state_dict, "block1.{}.layer_scale_1", 0)
        hidden = state_dict["block1.0.mlp.linear_in.weight"].shape[0] // 2
        mlp_ratios = mlp_ratio_for(embed_dims, hidden)

        model = EIMN(
            embed_dims=embed_dims,
            scale=scale,
            depths=depths,
            mlp_ratios=mlp_ratios,
            num_stages=num_stages,
            in_chans=in_chans,
            out_chans=out_chans,
        ).eval()  # BatchNorm must use its running statistics
        found = {"embed_dims": embed_dims, "num_stages": num_stages, "depths": depths}
        tags = [
            name
            for name, preset in PRESETS.items()
            if all(preset[k] == v for k, v in found.items())
            and int(embed_dims * float(preset["mlp_ratios"])) == hidden
        ]
        tags += [f"{embed_dims}dim", f"{num_stages}stages"]
        if depths != 1:
            tags.append(f"{depths}blocks/stage")
        return self.sr_descriptor(model, state_dict, scale=scale, tags=tags, input_channels=in_chans,
                                  output_channels=out_chans)

    def signature_model(self) -> EIMN:
        return EIMN(embed_dims=16, num_stages=2, depths=1, scale=2)


ARCHITECTURES = (EIMNArch(),)

__all__ = [
    "EIMN",
    "EIMN_L",
    "EIMN_A",
    "EIMNArch",
    "EIMNBlock",
    "MOLRCM",
    "SADFFM",
    "DFFM",
    "PRESETS",
    "mlp_ratio_for",
    "molrcm_split",
]
