"""DaViT-style SR transformer of Craap/models (``modules/attention.py``): window and channel attention.

``x - 0.5`` -> conv3 -> ``num_blocks`` x [spatial block, channel block] -> conv3 -> PixelShuffle -> ``+ 0.5``.
Each block is ``x += MHA(LN(x)); x += MLP(LN(x))`` with MLP = Linear(d, 4d), exact GELU, Linear(4d, d).

- Spatial block: attention inside non-overlapping ``window_size`` x ``window_size`` windows, no shift and
  no position bias; scores are ``(q / hd) @ (k / hd)^T`` (``hd`` = head dim; the reference's scaling,
  deliberately not ``hd^-0.5``).
- Channel block: per head, an ``hd x hd`` attention over all ``L = H*W`` tokens of the image, scores
  ``(q^T / L) @ (k / L)``, applied to ``v^T``. Because of the ``1/L^2`` scaling, the channel attention
  depends on the image size (larger images give flatter attention) — that is the reference's math.

Two key schemes exist. :class:`SR` has the current names (``layers.*``, ``project_q/k/v/out``).
The earlier ``TransformerSR`` (``in_conv``, ``blocks.{i}.{0,1}.window_attention.qkv`` fused q|k|v,
``window_attention.out``, ``out_conv.0``) computes the same function when it has no residual groups
(both of the author's published configurations had none), so its checkpoints are converted to
:class:`SR`'s names on loading (:func:`convert_old_state_dict`); :class:`TransformerSR` is kept for
checkpoints trained with residual groups (``load_transformer_sr(sd, residual_groups=[...])``).

Window size and number of heads leave no trace in the weights: loading assumes the published
values (4 and 16) unless told otherwise, by keyword or by a file name carrying ``w<N>_h<M>``
(``transformerSR_b8_d256_w4_h16.pt``, see :func:`hints_from_filename`).

Inference form (eval without autograd): the features stay window-ordered tokens ``[B, L, dim]`` from the
head conv to the tail conv (the channel block does not care about token order), every block updates
them in place, the spatial block uses one q|k|v GEMM with the ``1/hd`` factors folded in, the channel
block works from the Gram matrix ``nᵀn`` (see ``AttentionBlock._channel_attention``), and the matmuls
run on oneDNN (:func:`archs.blocks.fast_linear`). Same numbers to float rounding (~1e-5 relative);
training and the reference form are unchanged.

Padding (the reference has none and needs H, W to be multiples of the window): the input is
reflect-padded on the bottom/right to a multiple of ``window_size`` once, the whole network runs
on the padded image, and the output is cropped back. So every channel block sees the same ``L``
(the padded ``H*W``), exactly as the reference would on that padded image; the pad holds mirrored
image content rather than zeros, which keeps the global channel statistics close to the image's
own. Padding only inside the spatial blocks would leave ``L`` honest but make border windows mix
mirrored features of the hidden state, and zero padding would drag the channel statistics towards
zero. On sizes divisible by the window nothing is padded and the output equals the reference's.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import PurePath
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from spandrel import ImageModelDescriptor, StateDict
from spandrel.util import KeyCondition, get_seq_len, store_hyperparameters
from torch import Tensor, nn

from .blocks import fast_linear, pad_to_multiple, window_partition, window_reverse
from .errors import IncompatibleWeightsError
from .reparam import derived, inference_path
from .registry import FlexSRArchitecture, int_hints_from_filename

log = logging.getLogger("flexsr")

#: The author's published configuration (``transformerSR_b8_d256_w4_h16.pt``): ``SR(**PUBLISHED)``.
PUBLISHED: dict[str, int] = {"factor": 4, "num_blocks": 8, "dim": 256, "window_size": 4, "num_heads": 16}


def check_heads(dim: int, num_heads: int) -> None:
    """Raise ``ValueError`` unless ``num_heads`` is a positive divisor of ``dim``."""
    if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        divisors = [d for d in range(1, dim + 1) if dim % d == 0]
        raise ValueError(
            f"num_heads={num_heads!r} does not divide dim={dim}: each head gets dim // num_heads channels. "
            f"Choose num_heads from {divisors}."
        )


def attend(q: Tensor, k: Tensor, v: Tensor, num_heads: int, transposed: bool) -> Tensor:
    """The reference's multi-head attention core on projected ``q, k, v`` of shape ``[N, L, C]``.

    ``transposed=False``: per head ``softmax((q / hd) (k / hd)^T) v`` over the L tokens.
    ``transposed=True``: per head ``(softmax((q^T / L) (k / L)) v^T)^T``, an ``hd x hd`` attention
    between channels. Returns ``[N, L, C]``.
    """
    q, k, v = (rearrange(t, "n l (h d) -> n h l d", h=num_heads) for t in (q, k, v))
    if transposed:
        length = q.shape[-2]
        scores = torch.matmul(q.transpose(-2, -1) / length, k / length)  # [n h d d]
        out = torch.matmul(scores.softmax(-1), v.transpose(-2, -1))  # [n h d l]
        return rearrange(out, "n h d l -> n l (h d)")
    head_dim = q.shape[-1]
    scores = torch.matmul(q / head_dim, k.transpose(-2, -1) / head_dim)  # [n h l l]
    return rearrange(torch.matmul(scores.softmax(-1), v), "n h l d -> n l (h d)")


class MultiHeadAttention(nn.Module):
    """Self-attention with separate q/k/v projections (current scheme): ``[N, L, dim]`` -> ``[N, L, dim]``."""

    def __init__(self, dim: int, transposed: bool, num_heads: int = 8) -> None:
        super().__init__()
        check_heads(dim, num_heads)
        self.transposed = transposed
        self.num_heads = num_heads
        self.project_q = nn.Linear(dim, dim)
        self.project_k = nn.Linear(dim, dim)
        self.project_v = nn.Linear(dim, dim)
        self.project_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        out = attend(self.project_q(x), self.project_k(x), self.project_v(x), self.num_heads, self.transposed)
        return self.project_out(out)

    def projections(self) -> tuple[Tensor, ...]:
        """``(Wq, bq, Wk, bk, Wv, bv, Wout, bout)``."""
        return (self.project_q.weight, self.project_q.bias, self.project_k.weight, self.project_k.bias,
                self.project_v.weight, self.project_v.bias, self.project_out.weight, self.project_out.bias)


class MultiHeadSelfAttention(nn.Module):
    """The earlier form: one fused ``qkv`` Linear(dim, 3*dim) laid out q|k|v, then ``out``."""

    def __init__(self, dim: int, transposed: bool, num_heads: int = 8) -> None:
        super().__init__()
        check_heads(dim, num_heads)
        self.transposed = transposed
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(attend(q, k, v, self.num_heads, self.transposed))

    def projections(self) -> tuple[Tensor, ...]:
        """``(Wq, bq, Wk, bk, Wv, bv, Wout, bout)`` (views of the fused ``qkv``)."""
        wq, wk, wv = self.qkv.weight.chunk(3, dim=0)
        bq, bk, bv = self.qkv.bias.chunk(3, dim=0)
        return wq, bq, wk, bk, wv, bv, self.out.weight, self.out.bias


class AttentionBlock(nn.Module):
    """``x += MHA(LN(x)); x += MLP(LN(x))`` on ``[B, dim, H, W]`` features.

    Spatial (``transposed=False``): tokens are the pixels of each ``window_size`` window (H and W
    must be multiples of it). Channel (``transposed=True``): all H*W pixels are the tokens.
    ``fused_qkv`` picks the earlier ``TransformerSR`` parameter layout.
    """

    def __init__(
        self, dim: int, transposed: bool, window_size: int = 8, num_heads: int = 8, fused_qkv: bool = False
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.transposed = transposed
        attention = MultiHeadSelfAttention if fused_qkv else MultiHeadAttention
        self.window_attention = attention(dim, transposed, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.GELU(), nn.Linear(dim * 4, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self.transposed:
            t = rearrange(x, "b c h w -> b (h w) c")
        else:
            t = window_partition(x, self.window_size)
        t = t + self.window_attention(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        if self.transposed:
            return rearrange(t, "b (h w) c -> b c h w", h=h, w=w)
        return window_reverse(t, self.window_size, h, w)

    def forward_tokens_(self, t: Tensor) -> None:
        """Inference form, in place on tokens ``[B, L, dim]`` laid out window by window (each run of
        ``window_size²`` tokens is one window, row-major inside). The channel block is indifferent to the
        order of the tokens, so one layout serves both kinds of block."""
        dim = t.shape[-1]
        n = F.layer_norm(t, (dim,), self.norm1.weight, self.norm1.bias, self.norm1.eps)
        t += self._channel_attention(n) if self.transposed else self._window_attention(n)
        n = F.layer_norm(t, (dim,), self.norm2.weight, self.norm2.bias, self.norm2.eps)
        first, _, second = self.mlp
        t += fast_linear(fast_linear(n, first.weight, first.bias, gelu=True), second.weight, second.bias)

    def _window_attention(self, n: Tensor) -> Tensor:
        """Spatial attention of normed window tokens ``[B, L, dim]``: one q|k|v GEMM whose q and k rows carry
        the reference's ``1 / head_dim`` factors, batched matmuls over (window, head)."""
        b, length, dim = n.shape
        heads = self.window_attention.num_heads
        hd = dim // heads
        tokens = self.window_size**2
        wq, bq, wk, bk, wv, bv, wo, bo = self.window_attention.projections()

        def fold() -> tuple[Tensor, Tensor]:
            return torch.cat([wq / hd, wk / hd, wv]), torch.cat([bq / hd, bk / hd, bv])

        weight, bias = derived(self, "qkv", [wq, bq, wk, bk, wv, bv], fold)
        qkv = fast_linear(n, weight, bias).view(-1, tokens, 3, heads, hd).permute(2, 0, 3, 1, 4).contiguous()
        q, k, v = qkv.unbind(0)  # each [B*nW, heads, tokens, hd]
        out = torch.matmul(torch.matmul(q, k.transpose(-2, -1)).softmax(-1), v)
        out = out.transpose(1, 2).reshape(b, length, dim)
        return fast_linear(out, wo, bo)

    def _channel_attention(self, n: Tensor) -> Tensor:
        """Channel attention of normed tokens ``[B, L, dim]``, computed from ``n``'s Gram matrix.

        Per head the scores are ``qᵀk / L²`` with ``q = n Wqᵀ + bq``, ``k = n Wkᵀ + bk``, so
        ``qᵀk = Wq (nᵀn) Wkᵀ + (Wq Σn) bkᵀ + bq (Wk Σn)ᵀ + L bq bkᵀ``: one ``[dim, dim]`` Gram GEMM instead
        of two projections. The attention ``A`` (block diagonal over heads) is then linear in ``v``, so
        ``project_out(A v) = n E + c`` with ``E = Wvᵀ Aᵀ Woutᵀ`` and ``c = bv Aᵀ Woutᵀ + bout``, one more GEMM
        instead of a projection, the attention product and another projection.
        """
        b, length, dim = n.shape
        heads = self.window_attention.num_heads
        hd = dim // heads
        wq, bq, wk, bk, wv, bv, wo, bo = self.window_attention.projections()
        gram = torch.stack([fast_linear(item.t(), item.t()) for item in n])  # [B, dim, dim] = nᵀn
        total = n.sum(1)  # [B, dim]
        wk_heads = wk.view(heads, hd, dim)
        scores = torch.matmul(torch.matmul(wq, gram).view(b, heads, hd, dim), wk_heads.transpose(1, 2))
        q_sum = F.linear(total, wq).view(b, heads, hd, 1)  # Σ_l (q_l - bq)
        k_sum = F.linear(total, wk).view(b, heads, 1, hd)
        bq_h, bk_h = bq.view(heads, hd, 1), bk.view(heads, 1, hd)
        scores += q_sum * bk_h + bq_h * (k_sum + length * bk_h)
        attn = scores.mul_(1.0 / (length * length)).softmax(-1)  # [B, heads, hd(q), hd(v)]
        # mix[h·hd + j, o] = Σ_i attn[h, i, j] · Wout[o, h·hd + i]
        mix = torch.matmul(attn.transpose(-2, -1), wo.view(dim, heads, hd).permute(1, 2, 0)).reshape(b, dim, dim)
        weight = torch.matmul(mix.transpose(1, 2), wv)  # [B, dim_out, dim_in] = Eᵀ
        bias = torch.matmul(bv, mix) + bo
        return torch.stack([fast_linear(n[i], weight[i], bias[i]) for i in range(b)])


def _block_pair(dim: int, window_size: int, num_heads: int, fused_qkv: bool = False) -> nn.Sequential:
    return nn.Sequential(
        AttentionBlock(dim, False, window_size, num_heads, fused_qkv),
        AttentionBlock(dim, True, window_size, num_heads, fused_qkv),
    )


def _check_config(factor: int, num_blocks: int, dim: int, window_size: int, num_heads: int) -> None:
    for name, value, least in (("factor", factor, 1), ("num_blocks", num_blocks, 0), ("dim", dim, 1),
                               ("window_size", window_size, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}.")
    check_heads(dim, num_heads)


def _padded_forward(body, x: Tensor, window_size: int, factor: int) -> Tensor:
    h, w = x.shape[-2:]
    x = pad_to_multiple(x, window_size, mode="reflect")
    out = body(x - 0.5) + 0.5
    return out[..., : h * factor, : w * factor]


def _tokens_body(
    x: Tensor, head: nn.Conv2d, pairs: Sequence[nn.Module], tail: nn.Module, window_size: int,
    residual_groups: Sequence[int] = (),
) -> Tensor:
    """The network body in the inference form: ``tail(blocks(head(x)))`` with the features kept as window-
    ordered tokens ``[B, L, dim]`` from the head conv to the tail conv, every block updating them in place."""
    b, _, h, w = x.shape
    ws = window_size
    nh, nw = h // ws, w // ws
    feat = head(x.contiguous(memory_format=torch.channels_last))
    dim = feat.shape[1]
    tokens = feat.permute(0, 2, 3, 1).reshape(b, nh, ws, nw, ws, dim).transpose(2, 3).reshape(b, h * w, dim)
    saved: dict[int, Tensor] = {}
    for i, pair in enumerate(pairs):
        for step in residual_groups:
            if i % step == 0:
                saved[step] = tokens.clone()
        for block in pair:
            block.forward_tokens_(tokens)
        for step in residual_groups:
            if i % step == step - 1:
                tokens += saved[step]
    image = tokens.view(b, nh, nw, ws, ws, dim).transpose(2, 3).reshape(b, h, w, dim).permute(0, 3, 1, 2)
    return tail(image)


@store_hyperparameters()
class SR(nn.Module):
    """The DaViT-style SR transformer, current key scheme (``layers.*``).

    Input ``[B, in_channels, H, W]`` in 0..1, any H, W >= 1; output ``[B, out_channels, H*factor,
    W*factor]``. Published configuration: ``SR(**PUBLISHED)`` = ``SR(factor=4, num_blocks=8, dim=256,
    window_size=4, num_heads=16)``, 12,753,968 parameters.
    """

    hyperparameters: dict

    def __init__(
        self,
        *,
        factor: int,
        num_blocks: int,
        dim: int,
        window_size: int,
        num_heads: int,
        in_channels: int = 3,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        _check_config(factor, num_blocks, dim, window_size, num_heads)
        self.factor = factor
        self.window_size = window_size
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, dim, kernel_size=3, padding=1),
            *(_block_pair(dim, window_size, num_heads) for _ in range(num_blocks)),
            nn.Conv2d(dim, factor**2 * out_channels, kernel_size=3, padding=1),
            nn.PixelShuffle(factor),
        )

    def forward(self, x: Tensor) -> Tensor:
        if inference_path(self):
            return _padded_forward(self._inference_body, x, self.window_size, self.factor)
        return _padded_forward(self.layers, x, self.window_size, self.factor)

    def _inference_body(self, x: Tensor) -> Tensor:
        layers = list(self.layers)
        return _tokens_body(x, layers[0], layers[1:-2], nn.Sequential(*layers[-2:]), self.window_size)


@store_hyperparameters()
class TransformerSR(nn.Module):
    """The earlier key scheme (``in_conv``, ``blocks``, fused ``qkv``, ``out_conv``) with residual groups.

    ``residual_groups``: block counts between skip connections; for each ``step``, the features
    before block ``i`` with ``i % step == 0`` are added back after block ``i`` with
    ``i % step == step - 1`` (a trailing partial group gets no skip), as in the reference. Without
    residual groups it computes exactly what :class:`SR` computes with the converted weights.
    Shapes as :class:`SR`.
    """

    hyperparameters: dict

    def __init__(
        self,
        *,
        factor: int,
        residual_groups: Sequence[int] = (),
        num_blocks: int,
        dim: int,
        window_size: int,
        num_heads: int,
        in_channels: int = 3,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        _check_config(factor, num_blocks, dim, window_size, num_heads)
        steps = list(dict.fromkeys(residual_groups))
        if any(not isinstance(s, int) or s < 1 for s in steps):
            raise ValueError(f"residual_groups must be positive integers, got {list(residual_groups)!r}.")
        self.factor = factor
        self.window_size = window_size
        self.residual_groups = steps
        self.in_conv = nn.Conv2d(in_channels, dim, kernel_size=3, padding=1)
        self.blocks = nn.ModuleList(_block_pair(dim, window_size, num_heads, fused_qkv=True) for _ in range(num_blocks))
        self.out_conv = nn.Sequential(
            nn.Conv2d(dim, factor**2 * out_channels, kernel_size=3, padding=1),
            nn.PixelShuffle(factor),
        )

    def _body(self, x: Tensor) -> Tensor:
        x = self.in_conv(x)
        saved: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks):
            for step in self.residual_groups:
                if i % step == 0:
                    saved[step] = x
            x = block(x)
            for step in self.residual_groups:
                if i % step == step - 1:
                    x = x + saved[step]
        return self.out_conv(x)

    def forward(self, x: Tensor) -> Tensor:
        body = self._inference_body if inference_path(self) else self._body
        return _padded_forward(body, x, self.window_size, self.factor)

    def _inference_body(self, x: Tensor) -> Tensor:
        return _tokens_body(x, self.in_conv, self.blocks, self.out_conv, self.window_size, self.residual_groups)


# --------------------------------------------------------------------------------------------------
# Key schemes and loading

def convert_old_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an earlier-``TransformerSR`` state dict to :class:`SR`'s keys, splitting fused ``qkv``.

    ``in_conv.*`` -> ``layers.0.*``; ``blocks.{i}.{j}.*`` -> ``layers.{i+1}.{j}.*`` with
    ``window_attention.qkv`` split into ``project_q/k/v`` (rows q|k|v) and ``window_attention.out`` ->
    ``project_out``; ``out_conv.0.*`` -> ``layers.{n+1}.*``. Keys it does not know are kept as they
    are, so a strict load reports them.
    """
    n = get_seq_len(state_dict, "blocks")
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("in_conv."):
            out["layers.0." + key[len("in_conv."):]] = value
        elif key.startswith("out_conv.0."):
            out[f"layers.{n + 1}." + key[len("out_conv.0."):]] = value
        elif m := re.fullmatch(r"blocks\.(\d+)\.([01])\.(.+)", key):
            prefix, rest = f"layers.{int(m[1]) + 1}.{m[2]}.", m[3]
            if rest.startswith("window_attention.qkv."):
                kind = rest.rsplit(".", 1)[1]
                if value.shape[0] % 3:
                    raise IncompatibleWeightsError(
                        f"'{key}' has {value.shape[0]} rows; a fused q|k|v projection needs a multiple of 3."
                    )
                for name, part in zip(("project_q", "project_k", "project_v"), value.chunk(3, dim=0)):
                    out[f"{prefix}window_attention.{name}.{kind}"] = part
            elif rest.startswith("window_attention.out."):
                out[prefix + "window_attention.project_out." + rest.rsplit(".", 1)[1]] = value
            else:
                out[prefix + rest] = value
        else:
            out[key] = value
    return out


def hints_from_filename(name: str | PurePath) -> dict[str, int]:
    """Window size and heads named in a file name: ``..._w4_h16.pt`` -> ``{"window_size": 4, "num_heads": 16}``."""
    return int_hints_from_filename(name, TransformerSRArch.filename_hints)


def _factor_and_out_channels(rows: int, in_channels: int) -> tuple[int, int]:
    """Split the tail conv's ``factor**2 * out_channels`` rows, preferring ``out == in`` channels."""
    for out in dict.fromkeys((in_channels, 3, 1, 4)):
        if rows % out == 0 and math.isqrt(rows // out) ** 2 == rows // out:
            return math.isqrt(rows // out), out
    return 1, rows


def _conv3(state_dict: Mapping[str, Tensor], key: str) -> Tensor:
    weight = state_dict.get(key)
    if weight is None or weight.ndim != 4 or tuple(weight.shape[2:]) != (3, 3):
        shape = "missing" if weight is None else f"shape {tuple(weight.shape)}"
        raise IncompatibleWeightsError(f"TransformerSR checkpoint: '{key}' should be a 3x3 conv weight ({shape}).")
    return weight


_CURRENT = KeyCondition.has_all(
    "layers.0.weight",
    "layers.0.bias",
    *(
        f"layers.1.{j}.{name}"
        for j in (0, 1)
        for name in (
            "window_attention.project_q.weight",
            "window_attention.project_k.weight",
            "window_attention.project_v.weight",
            "window_attention.project_out.weight",
            "mlp.0.weight",
            "mlp.2.weight",
            "norm1.weight",
            "norm2.weight",
        )
    ),
)
_OLD = KeyCondition.has_all(
    "in_conv.weight",
    "out_conv.0.weight",
    *(
        f"blocks.0.{j}.{name}"
        for j in (0, 1)
        for name in ("window_attention.qkv.weight", "window_attention.out.weight", "mlp.0.weight", "mlp.2.weight",
                     "norm1.weight", "norm2.weight")
    ),
)


class TransformerSRArch(FlexSRArchitecture):
    """spandrel architecture of the DaViT-style SR transformer; both key schemes, loaded as :class:`SR`.

    ``load(state_dict, window_size=None, num_heads=None, residual_groups=None)``: the options are
    what the weights cannot show; ``None`` means the published 4 / 16 / none.
    """

    load_options = ("window_size", "num_heads", "residual_groups")

    def __init__(self) -> None:
        super().__init__(id="TransformerSR", name="TransformerSR", detect=KeyCondition.has_any(_CURRENT, _OLD))

    filename_hints = {"window_size": "w", "num_heads": "h"}

    def signature_model(self) -> nn.Module:
        return SR(factor=2, num_blocks=1, dim=16, window_size=4, num_heads=4)

    def load(
        self,
        state_dict: StateDict,
        window_size: int | None = None,
        num_heads: int | None = None,
        residual_groups: Iterable[int] | None = None,
    ) -> ImageModelDescriptor:
        old = "in_conv.weight" in state_dict
        head = _conv3(state_dict, "in_conv.weight" if old else "layers.0.weight")
        dim, in_channels = head.shape[:2]
        num_blocks = get_seq_len(state_dict, "blocks") if old else get_seq_len(state_dict, "layers") - 2
        if num_blocks < 1:
            raise IncompatibleWeightsError("TransformerSR checkpoint without attention blocks.")
        tail = _conv3(state_dict, "out_conv.0.weight" if old else f"layers.{num_blocks + 1}.weight")
        factor, out_channels = _factor_and_out_channels(tail.shape[0], in_channels)

        ws = PUBLISHED["window_size"] if window_size is None else window_size
        heads = PUBLISHED["num_heads"] if num_heads is None else num_heads
        if not isinstance(ws, int) or ws < 1:
            raise IncompatibleWeightsError(f"window_size must be a positive integer, got {ws!r}.")
        try:
            check_heads(dim, heads)
        except ValueError as e:
            how = f"the published default {heads}" if num_heads is None else f"num_heads={heads}"
            raise IncompatibleWeightsError(
                f"This TransformerSR checkpoint has dim={dim}, and {how} does not fit it: {e} The number of "
                f"heads is not stored in the weights; pass num_heads=..., or name the file '..._w<N>_h<M>.pt'."
            ) from None
        groups = list(residual_groups or ())
        if groups and not old:
            raise IncompatibleWeightsError(
                "residual_groups applies only to checkpoints of the earlier TransformerSR key scheme "
                "(in_conv/blocks/out_conv); this one uses the current layers.* scheme, which has none."
            )
        if window_size is None or num_heads is None:
            log.info(
                "TransformerSR: window size %d and %d heads are not stored in the weights; %s. Pass "
                "window_size=/num_heads= or name the file '..._w<N>_h<M>.pt' if it was trained otherwise.",
                ws, heads, "assumed the published values" if window_size is None and num_heads is None
                else "used the published value for the one not given",
            )

        config = dict(factor=factor, num_blocks=num_blocks, dim=dim, window_size=ws, num_heads=heads,
                      in_channels=in_channels, out_channels=out_channels)
        if groups:
            model: nn.Module = TransformerSR(residual_groups=groups, **config)
            weights = dict(state_dict)
        else:
            model = SR(**config)
            weights = convert_old_state_dict(state_dict) if old else dict(state_dict)

        tags = [
            f"{dim}dim",
            f"{num_blocks}nb",
            f"w{ws}" + (" (assumed)" if window_size is None else ""),
            f"h{heads}" + (" (assumed)" if num_heads is None else ""),
        ]
        if old:
            tags.append("TransformerSR keys" + (f", residual groups {groups}" if groups else ""))
        try:
            return self.sr_descriptor(model, weights, scale=factor, tags=tags, input_channels=in_channels,
                                      output_channels=out_channels)
        except RuntimeError as e:
            raise IncompatibleWeightsError(
                f"TransformerSR weights do not fit the model read from their shapes "
                f"({str(e).strip().splitlines()[0][:300]} ...). The file may be damaged or of another variant."
            ) from e


TRANSFORMER_SR = TransformerSRArch()
ARCHITECTURES = (TRANSFORMER_SR,)


def load_transformer_sr(
    state_dict: Mapping[str, Tensor],
    window_size: int | None = None,
    num_heads: int | None = None,
    residual_groups: Iterable[int] | None = None,
) -> ImageModelDescriptor:
    """Load a TransformerSR state dict (either key scheme) with the given window size / heads / groups.

    ``None`` means the published value (window 4, 16 heads, no residual groups). Returns a spandrel
    ``ImageModelDescriptor`` in eval mode; raises ``IncompatibleWeightsError`` if the weights do not fit.
    """
    return TRANSFORMER_SR.load(dict(state_dict), window_size, num_heads, residual_groups).eval()


__all__ = [
    "PUBLISHED",
    "SR",
    "TransformerSR",
    "TransformerSRArch",
    "ARCHITECTURES",
    "attend",
    "check_heads",
    "convert_old_state_dict",
    "hints_from_filename",
    "load_transformer_sr",
]
