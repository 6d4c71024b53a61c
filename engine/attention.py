"""Cross-attention capture: where does each concept token look?

Installs a capturing processor on the chosen cross-attention layers only (default: the layers
at 1/4 of the latent resolution in the down and up blocks - the 16x16 layers of SD at 512 px,
as Break-a-Scene uses); every other layer keeps diffusers' fused SDPA processor. A captured
layer computes its attention probabilities explicitly, averages them over heads and keeps
only the probability mass on the watched tokens, so memory grows with the captured layers
and tokens, not with the UNet.

A map is: for token k and latent pixel q, the attention probability mass on the prompt
positions of k (all its vectors, every place it occurs), averaged over heads, captured
layers (resized to the largest captured resolution) and the forward calls since `reset()`.
Values lie in [0, 1]; a token that is not in the prompt has an all-zero map.

Two modes: `detach=True` (mask estimates, the sampler's debugger) accumulates running sums;
`detach=False` (the cross-attention loss) keeps the graph of the calls since `reset()`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cross_attention_layers(unet) -> dict[str, int]:
    """Name of every cross-attention module (attn2) -> its level (0 = full latent resolution)."""
    out = {}
    n_down = len(unet.down_blocks)
    for name, module in unet.named_modules():
        if not name.endswith("attn2") or not hasattr(module, "to_q"):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            out[name] = int(parts[1])
        elif parts[0] == "up_blocks":
            out[name] = n_down - 1 - int(parts[1])
        elif parts[0] == "mid_block":
            out[name] = n_down - 1
    return out


def default_layers(unet, level: int = 2) -> list[str]:
    """The down/up-block cross-attention layers at 1/2**level of the latent size (16x16 at 512 px),
    or at the nearest level that has cross-attention (small test models)."""
    layers = {n: lv for n, lv in cross_attention_layers(unet).items() if not n.startswith("mid_block")}
    if not layers:
        raise ValueError("this UNet has no cross-attention layers in its down/up blocks")
    best = min(set(layers.values()), key=lambda lv: (abs(lv - level), -lv))
    return sorted(n for n, lv in layers.items() if lv == best)


def token_position_mask(bundle, prompts: list[str], tokens: list[str]) -> torch.Tensor:
    """[B, K, 77]: 1 where prompt b holds (a vector of) concept token k."""
    from .tokens import expand_prompt

    ids = bundle.tokenize([expand_prompt(bundle, p) for p in prompts])
    out = torch.zeros(len(prompts), len(tokens), ids.shape[1])
    for k, token in enumerate(tokens):
        for tid in bundle.added_tokens.get(token, []):
            out[:, k] += (ids == tid).float()
    return out


class _CaptureProcessor:
    """diffusers' plain AttnProcessor, plus handing the probabilities to the capture."""

    def __init__(self, capture: "AttentionCapture", name: str):
        self.capture = capture
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.capture._add(self.name, probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class AttentionCapture:
    """Context manager: `with AttentionCapture(unet) as cap: cap.watch(mask); unet(...); cap.maps()`."""

    def __init__(self, unet, layers: list[str] | None = None, *, detach: bool = True):
        known = cross_attention_layers(unet)
        self.layers = list(layers) if layers else default_layers(unet)
        unknown = [n for n in self.layers if n not in known]
        if unknown:
            raise ValueError(f"not cross-attention layers: {unknown}")
        self.unet = unet
        self.detach = detach
        self._positions: torch.Tensor | None = None
        self._saved = None
        self.reset()

    # ------------------------------------------------------------ install / remove
    def __enter__(self) -> "AttentionCapture":
        self._saved = dict(self.unet.attn_processors)
        procs = {}
        for key, proc in self._saved.items():
            name = key[: -len(".processor")]
            procs[key] = _CaptureProcessor(self, name) if name in self.layers else proc
        self.unet.set_attn_processor(procs)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            self.unet.set_attn_processor(self._saved)
            self._saved = None

    # ------------------------------------------------------------ use
    def watch(self, positions: torch.Tensor) -> None:
        """positions [B, K, 77] (token_position_mask) for the UNet batch that follows; rows of
        all zeros (e.g. the unconditional half under CFG) give zero maps."""
        self._positions = positions

    def reset(self) -> None:
        self._sum: dict[int, torch.Tensor] = {}  # resolution (pixels) -> summed maps [B, K, HW]
        self._count = 0
        self._calls: list[torch.Tensor] = []  # differentiable mode

    def _add(self, name: str, probs: torch.Tensor, heads: int) -> None:
        if self._positions is None:
            return
        pos = self._positions.to(probs.device, probs.dtype)
        b = pos.shape[0]
        if probs.shape[0] != b * heads:
            raise ValueError(f"capture watches a batch of {b} but the UNet ran {probs.shape[0] // heads}")
        p = probs.view(b, heads, probs.shape[1], probs.shape[2]).mean(1)  # [B, HW, 77]
        maps = torch.einsum("bqt,bkt->bkq", p, pos).float()  # [B, K, HW]
        if self.detach:
            maps = maps.detach()
            hw = maps.shape[-1]
            self._sum[hw] = self._sum[hw] + maps if hw in self._sum else maps.clone()
            self._count += 1
        else:
            self._calls.append(maps)

    def maps(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """[B, K, h, w] maps averaged over the captured calls (at `size`, default the largest
        captured resolution)."""
        groups = [(hw, m) for hw, m in self._sum.items()] if self.detach else [(m.shape[-1], m) for m in self._calls]
        if not groups:
            raise RuntimeError("nothing was captured: call watch() before running the UNet")
        side = max(int(math.isqrt(hw)) for hw, _ in groups)
        size = size or (side, side)
        total, n = 0, 0
        for hw, m in groups:
            s = int(math.isqrt(hw))
            grid = m.reshape(*m.shape[:2], s, s)
            total = total + F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
            n += 1
        return total / max(self._count if self.detach else n, 1)

    @staticmethod
    def normalized(maps: torch.Tensor) -> torch.Tensor:
        """Each map divided by its own maximum (all-zero maps stay zero): for display and MASKs."""
        peak = maps.flatten(2).amax(-1)[..., None, None]
        return torch.where(peak > 0, maps / peak.clamp(min=1e-12), torch.zeros_like(maps))
