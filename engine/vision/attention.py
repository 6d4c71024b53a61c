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

Maps keep the latent's shape: a layer of a h x w latent at 1/f of its resolution gives a
ceil(h/f) x ceil(w/f) map (the UNet's stride-2 convolutions round up), so 512x768 pictures give
16x24 maps, never a square guess. The capture reads the latent size from each UNet call (a
forward pre-hook) or from `latent_size` when the attention layers are driven directly.

Two modes: `detach=True` (mask estimates, the sampler's debugger) accumulates running sums;
`detach=False` (the cross-attention loss) keeps the graph of the calls since `reset()`.
"""

from __future__ import annotations

import weakref

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
    from ..models.concept_tokens import expand_prompt

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
        cond = encoder_hidden_states  # (what the UNet was called with: a recomputed block sees it again)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.capture._add(self.name, probs, attn.heads, cond)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class AttentionCapture:
    """Context manager: `with AttentionCapture(unet) as cap: cap.watch(mask); unet(...); cap.maps()`."""

    def __init__(self, unet, layers: list[str] | None = None, *, detach: bool = True,
                 latent_size: tuple[int, int] | None = None):
        known = cross_attention_layers(unet)
        self.layers = list(layers) if layers else default_layers(unet)
        unknown = [n for n in self.layers if n not in known]
        if unknown:
            raise ValueError(f"not cross-attention layers: {unknown}")
        self.unet = unet
        self.detach = detach
        self._positions: torch.Tensor | None = None
        # id(conditioning) -> (weak ref, positions, latent size) of the watched UNet calls: with gradient
        # checkpointing a block runs again during backward, after the batch's watch ended, and must
        # capture the same way (torch checks that the recomputation saves the same tensors)
        self._by_cond: dict[int, tuple] = {}
        self._saved = None
        self._hook = None
        # (h, w) of the latent the UNet runs on; set by each UNet call, or given
        self.latent_size = tuple(latent_size) if latent_size else None
        self.reset()

    # ------------------------------------------------------------ install / remove
    def __enter__(self) -> "AttentionCapture":
        self._saved = dict(self.unet.attn_processors)
        procs = {}
        for key, proc in self._saved.items():
            name = key[: -len(".processor")]
            procs[key] = _CaptureProcessor(self, name) if name in self.layers else proc
        self.unet.set_attn_processor(procs)
        self._hook = self.unet.register_forward_pre_hook(self._see_latent, with_kwargs=True)
        return self

    def _see_latent(self, _module, args, kwargs) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            self.latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))
        cond = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        if self._positions is not None and isinstance(cond, torch.Tensor):
            self._by_cond[id(cond)] = (weakref.ref(cond), self._positions, self.latent_size)

    def __exit__(self, *exc) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._saved is not None:
            self.unet.set_attn_processor(self._saved)
            self._saved = None

    # ------------------------------------------------------------ use
    def watch(self, positions: torch.Tensor) -> None:
        """positions [B, K, 77] (token_position_mask) for the UNet batch that follows; rows of
        all zeros (e.g. the unconditional half under CFG) give zero maps."""
        if positions is not None:
            self._by_cond = {}  # a new batch: the last one's backward is done
        self._positions = positions

    def reset(self) -> None:
        self._sum: dict[tuple[int, int], torch.Tensor] = {}  # map size (h, w) -> summed maps [B, K, h, w]
        self._count = 0
        self._calls: list[torch.Tensor] = []  # differentiable mode: maps [B, K, h, w] of each call

    def grid_size(self, pixels: int, latent_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """(h, w) of a layer's map holding `pixels` positions, from the latent size."""
        latent_size = latent_size or self.latent_size
        if latent_size is None:
            raise RuntimeError("the capture does not know the latent size: run the UNet inside the capture, or "
                               "give latent_size=(h, w)")
        h, w = latent_size
        f = 1
        while f <= max(h, w):
            gh, gw = -(-h // f), -(-w // f)  # ceil: stride-2 convolutions with padding 1 round up
            if gh * gw == pixels:
                return gh, gw
            f *= 2
        raise RuntimeError(f"a map of {pixels} positions fits no level of a {h}x{w} latent")

    def _add(self, name: str, probs: torch.Tensor, heads: int, cond: torch.Tensor | None = None) -> None:
        pos, latent_size = self._positions, None
        if pos is None and cond is not None:  # a checkpointed block recomputed during backward
            rec = self._by_cond.get(id(cond))
            if rec is not None and rec[0]() is cond:
                pos, latent_size = rec[1], rec[2]
        if pos is None:
            return
        pos = pos.to(probs.device, probs.dtype)
        b = pos.shape[0]
        if probs.shape[0] != b * heads:
            raise ValueError(f"capture watches a batch of {b} but the UNet ran {probs.shape[0] // heads}")
        p = probs.view(b, heads, probs.shape[1], probs.shape[2]).mean(1)  # [B, HW, 77]
        maps = torch.einsum("bqt,bkt->bkq", p, pos).float()  # [B, K, HW], HW row-major as the UNet flattens
        maps = maps.reshape(*maps.shape[:2], *self.grid_size(maps.shape[-1], latent_size))
        if self.detach:
            maps = maps.detach()
            hw = tuple(maps.shape[-2:])
            self._sum[hw] = self._sum[hw] + maps if hw in self._sum else maps.clone()
            self._count += 1
        else:
            self._calls.append(maps)

    def maps(self, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """[B, K, h, w] maps averaged over the captured calls (at `size` (h, w), default the largest
        captured map)."""
        groups = list(self._sum.values()) if self.detach else self._calls
        if not groups:
            raise RuntimeError("nothing was captured: call watch() before running the UNet")
        size = (size, size) if isinstance(size, int) else tuple(size or max((tuple(m.shape[-2:]) for m in groups),
                                                                          key=lambda hw: hw[0] * hw[1]))
        total, n = 0, 0
        for m in groups:
            total = total + (m if tuple(m.shape[-2:]) == size else
                             F.interpolate(m, size=size, mode="bilinear", align_corners=False))
            n += 1
        return total / max(self._count if self.detach else n, 1)

    @staticmethod
    def normalized(maps: torch.Tensor) -> torch.Tensor:
        """Each map divided by its own maximum (all-zero maps stay zero): for display and MASKs."""
        peak = maps.flatten(2).amax(-1)[..., None, None]
        return torch.where(peak > 0, maps / peak.clamp(min=1e-12), torch.zeros_like(maps))
