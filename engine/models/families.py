"""Model families as strategies: one object per family owns everything that differs between them.

Trainers, the sampler, the mask EM and the exports ask the family, never the models directly:
how prompts become token ids and UNet conditioning (one or two text encoders, pooled output),
how the UNet is called (added conditioning), which text encoders take concept token rows and
LoRA and under which kohya prefix they are exported, the embedding-file keys, the default
cross-attention layers to capture, and the native resolution.

`family_of(bundle)` gives the bundle's family object; `bundle.family` stays the short string
("sd1", "sd2", "sdxl") that saved metadata and configs hold. A new family is one new class here
registered in `FAMILIES`, plus its tests (docs/trainer-core.md lists what SDXL added).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Conditioning:
    """What the UNet is conditioned on: the text hidden states [B, 77, D], plus (for families
    that have them) a pooled text embedding and other added conditioning."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds, time_ids

    def to(self, *args, **kwargs) -> "Conditioning":
        return Conditioning(self.hidden.to(*args, **kwargs), {k: v.to(*args, **kwargs) for k, v in self.added.items()})

    def detach(self) -> "Conditioning":
        return Conditioning(self.hidden.detach(), {k: v.detach() for k, v in self.added.items()})

    def expand(self, b: int) -> "Conditioning":
        return Conditioning(self.hidden.expand(b, *self.hidden.shape[1:]),
                            {k: v.expand(b, *v.shape[1:]) for k, v in self.added.items()})

    def rows(self) -> list["Conditioning"]:
        """One Conditioning per prompt (for caching per caption)."""
        return [Conditioning(self.hidden[i:i + 1], {k: v[i:i + 1] for k, v in self.added.items()})
                for i in range(self.hidden.shape[0])]

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        return Conditioning(torch.cat([p.hidden for p in parts]),
                            {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added})


class Family:
    """SD-style latent diffusion with one CLIP text encoder (the SD 1.x shape). Subclasses
    change only what differs."""

    name = "sd1"
    title = "Stable Diffusion 1.x"
    short_title = "SD 1.x"  # in sentences and labels
    comfy_class = "SD15"  # ComfyUI's model config class of the family (the native hand-off reads it)
    resolution = 512  # native training/sampling size
    tokenizer_pad = "<|endoftext|>"  # SD1 pads with <|endoftext|>, SD2 with "!" (as ComfyUI does)
    # CLIF's image tower: the open_clip model whose text tower the contrastive encoder is, and its width
    clif_tower = ("ViT-L-14", 768, "OpenAI CLIP ViT-L/14 (text width 768)")
    # text-encoder attribute of the bundle -> (embedding-file key, kohya LoRA prefix)
    text_encoders = {"text_encoder": ("clip_l", "lora_te_")}
    attention_level = 2  # cross-attention captured at 1/2**level of the latent size (16x16 at 512 px)

    # ------------------------------------------------------------ text
    def encoders(self, bundle) -> dict[str, torch.nn.Module]:
        """The bundle's text encoders by attribute name (the modules that take token rows and LoRA)."""
        return {attr: getattr(bundle, attr) for attr in self.text_encoders}

    def tokenize(self, bundle, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, 77], padded as the family does (and as ComfyUI does)."""
        tok = bundle.tokenizer
        return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    def encode_ids(self, bundle, ids: torch.Tensor) -> Conditioning:
        """UNet conditioning from token ids: the text encoder's last hidden state (for SD2 the model
        already stops at the penultimate layer, with the final layer norm, as SD2 uses it)."""
        te = bundle.text_encoder
        return Conditioning(te(ids.to(te.device))[0])

    # the text encoder CLIF trains against a CLIP image tower (SDXL: CLIP-L with ViT-L/14, as the
    # public CLIF code does; docs/sdxl.md says why not bigG as well)
    contrastive_encoder = "text_encoder"

    def contrastive_hidden(self, bundle, ids: torch.Tensor) -> torch.Tensor:
        """[B, 77, D]: the contrastive encoder's last hidden state after its final layer norm, where
        CLIP's pooled text feature is read (CLIF). For SD1/SD2 the same as the UNet conditioning."""
        te = getattr(bundle, self.contrastive_encoder)
        return te(ids.to(te.device))[0]

    def encode(self, bundle, prompts: list[str]) -> Conditioning:
        from .concept_tokens import expand_prompt

        return self.encode_ids(bundle, self.tokenize(bundle, [expand_prompt(bundle, p) for p in prompts]))

    # ------------------------------------------------------------ UNet
    def call_unet(self, unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                  dtype: torch.dtype | None = None, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's prediction (epsilon or v) for noisy latents at timesteps. `sizes` [B, 4]: each
        training image's original height, width and crop top, left (used by families with size
        conditioning: SDXL)."""
        hidden = cond.hidden if dtype is None else cond.hidden.to(dtype)
        added = {k: (v if dtype is None else v.to(dtype)) for k, v in cond.added.items()}
        return unet(noisy, timesteps, hidden, added_cond_kwargs=added or None).sample

    def pipeline(self, bundle, scheduler):
        """diffusers' text-to-image pipeline for this family, fed with our own conditioning."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
                                       unet=bundle.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def pipeline_inputs(self, cond: Conditioning, uncond: Conditioning) -> dict:
        return {"prompt_embeds": cond.hidden, "negative_prompt_embeds": uncond.hidden}

    # ------------------------------------------------------------ exports
    def embedding_state(self, bundle, token: str) -> dict[str, torch.Tensor]:
        """An embedding file's tensors for a concept token: key -> rows [n, D] per text encoder."""
        from .concept_tokens import token_rows

        return {key: token_rows(bundle, token, attr) for attr, (key, _) in self.text_encoders.items()}

    def embedding_key(self, attr: str = "text_encoder") -> str:
        return self.text_encoders[attr][0]

    def lora_prefix(self, attr: str = "text_encoder") -> str:
        return self.text_encoders[attr][1]

    # ------------------------------------------------------------ attention
    def attention_layers(self, unet) -> list[str]:
        from ..vision.attention import default_layers

        return default_layers(unet, self.attention_level)

    def default_resolution(self, bundle) -> int:
        return self.resolution


class SD2(Family):
    """SD 2.x: OpenCLIP ViT-H text encoder (cut at the penultimate layer), 768 px for the v-models."""

    name = "sd2"
    title = "Stable Diffusion 2.x"
    short_title = "SD 2.x"
    comfy_class = "SD20"
    tokenizer_pad = "!"
    clif_tower = ("ViT-H-14", 1024, "OpenCLIP ViT-H/14 (text width 1024)")
    text_encoders = {"text_encoder": ("clip_h", "lora_te_")}

    def default_resolution(self, bundle) -> int:
        return 768 if bundle.prediction_type == "v_prediction" else 512


class SD1(Family):
    """SD 1.x: OpenAI CLIP ViT-L text encoder, 512 px (the base class is its shape)."""


class SDXL(Family):
    """SDXL: two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG with its projection), both read at
    their penultimate layer and concatenated (768 + 1280 = 2048 wide); the UNet's added conditioning
    is bigG's pooled, projected embedding (`text_embeds`) and six size/crop numbers (`time_ids`:
    original height/width, crop top/left, target height/width). 1024 px."""

    name = "sdxl"
    title = "Stable Diffusion XL"
    short_title = "SDXL"
    comfy_class = "SDXL"
    resolution = 1024
    # the first tokenizer pads with <|endoftext|>, the second (bigG's) with "!" (id 0), as diffusers'
    # tokenizer_2 and ComfyUI's SDXLClipGTokenizer do
    tokenizer_2_pad = "!"
    clif_tower = ("ViT-L-14", 768, "OpenAI CLIP ViT-L/14 (text width 768: CLIF trains SDXL's CLIP-L encoder)")
    text_encoders = {"text_encoder": ("clip_l", "lora_te1_"), "text_encoder_2": ("clip_g", "lora_te2_")}
    # 32x32 at 1024 px: the 1280-channel level (down_blocks.2, up_blocks.0), the same 32-pixel cells
    # as SD's 16x16 layers at 512 px (docs/sdxl.md says why)
    attention_level = 2

    def second_ids(self, bundle, ids: torch.Tensor) -> torch.Tensor:
        """The second tokenizer's ids: the same vocabulary and the same added tokens, only padded
        with "!" (id 0) after the end token instead of <|endoftext|> (diffusers' tokenizer_2, ComfyUI's
        SDXLClipGTokenizer), so it is derived from the first ids rather than tokenized again."""
        tok2 = getattr(bundle, "tokenizer_2", None)
        pad = tok2.pad_token_id if tok2 is not None and tok2.pad_token_id is not None else 0
        eos = bundle.tokenizer.eos_token_id
        first_end = (ids == eos).int().argmax(-1, keepdim=True)
        pos = torch.arange(ids.shape[-1], device=ids.device)
        return torch.where(pos > first_end, torch.full_like(ids, pad), ids)

    def encode_ids(self, bundle, ids: torch.Tensor) -> Conditioning:
        te1, te2 = bundle.text_encoder, bundle.text_encoder_2
        ids = ids.to(te1.device)
        h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
        out2 = te2(self.second_ids(bundle, ids).to(te2.device), output_hidden_states=True)
        hidden = torch.cat([h1, out2.hidden_states[-2].to(h1)], dim=-1)
        return Conditioning(hidden, {"text_embeds": out2.text_embeds.to(hidden.dtype)})

    @staticmethod
    def time_ids(height: int, width: int, *, original: tuple[int, int] | None = None,
                 crop: tuple[int, int] = (0, 0), batch: int = 1) -> torch.Tensor:
        """[B, 6]: original (h, w), crop top-left (top, left), target (h, w), in pixels. By default the
        image counts as uncropped at its target size - what the SDXL pipeline and ComfyUI's sampler
        send at inference, and what the trainers' already-fitted images are."""
        oh, ow = original or (height, width)
        return torch.tensor([[oh, ow, crop[0], crop[1], height, width]], dtype=torch.float32).repeat(batch, 1)

    def call_unet(self, unet, noisy, timesteps, cond, dtype=None, sizes=None):
        if "time_ids" not in cond.added:
            # the target size is the latents' (any aspect ratio / bucket); a training image's original
            # size and crop come with it (`sizes`, as diffusers' and kohya's SDXL trainers condition),
            # else the image counts as uncropped at the target size (what inference sends by default)
            h, w = noisy.shape[-2] * 8, noisy.shape[-1] * 8
            ids = self.time_ids(h, w, batch=noisy.shape[0])
            if sizes is not None:
                ids[:, :4] = sizes.to(ids)
            cond = Conditioning(cond.hidden, {**cond.added, "time_ids": ids.to(noisy.device)})
        if cond.added["text_embeds"].shape[0] != noisy.shape[0]:
            cond = cond.expand(noisy.shape[0])
        return super().call_unet(unet, noisy, timesteps, cond, dtype)

    def pipeline(self, bundle, scheduler):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder,
                                         text_encoder_2=bundle.text_encoder_2, tokenizer=bundle.tokenizer,
                                         tokenizer_2=bundle.tokenizer_2, unet=bundle.unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=False, add_watermarker=False)

    def pipeline_inputs(self, cond: Conditioning, uncond: Conditioning) -> dict:
        return {"prompt_embeds": cond.hidden, "negative_prompt_embeds": uncond.hidden,
                "pooled_prompt_embeds": cond.added["text_embeds"],
                "negative_pooled_prompt_embeds": uncond.added["text_embeds"]}


FAMILIES: dict[str, Family] = {f.name: f for f in (SD1(), SD2(), SDXL())}


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None


def family_of(bundle) -> Family:
    """The family object of a bundle (by its `family` string)."""
    return family_named(bundle.family)
