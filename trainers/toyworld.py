"""Training the toy world's miniature SD 1.x model from scratch (`python -m unconfused toyworld train`).

Stages, each resumable from its last checkpoint and deterministic from the world seed (a batch
is a pure function of the stage and the step: scenes by index, noise from a per-step generator):
  clip    - CLIP contrastive: the SD text encoder (transformers CLIPTextModel, real CLIP tokenizer)
            against an open_clip ViT image tower; each image also meets its own caption with the
            objects' colours swapped, as a hard negative (so the text side binds colour to object)
  vae     - AutoencoderKL (8x down, 4 latent channels) on the world's pictures, MSE + L1, tiny KL
  latents - VAE posterior means of the UNet's training scenes, scaled to unit variance
  unet    - UNet2DConditionModel, epsilon prediction with SD's schedule, frozen text tower,
            10% empty captions (for guidance), min-SNR weighting, EMA of the weights
  export  - the diffusers folder + open_clip file (fp16 safetensors, settings in the metadata)
  oracle  - the oracle (engine/evaluation/oracle.py) on rendered scenes, half of them through the trained VAE;
            validated on held-out renders and their VAE round trip (accuracy in its metadata)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine.evaluation import toyworld as tw
from ..engine.vision.clip_zero_shot import OPENAI_MEAN, OPENAI_STD
from ..engine.files import atomic_save_safetensors, atomic_write_json

log = logging.getLogger("unconfused")
STAGES = ("clip", "vae", "latents", "unet", "export", "oracle")


@dataclass
class ToySettings:
    seed: int = 0
    clip_steps: int = 1500
    clip_batch: int = 64
    clip_lr: float = 5e-4
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 1e-3
    latent_scenes: int = 16384
    unet_steps: int = 4000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    ema: float = 0.999
    save_every: int = 100
    oracle_steps: int = 500
    oracle_batch: int = 16
    oracle_shape_steps: int = 300
    notes: str = ""  # anything a reader of the weights' metadata must know (e.g. a changed resume)


QUICK = dict(clip_steps=3, clip_batch=8, vae_steps=3, vae_batch=4, latent_scenes=16, unet_steps=3, unet_batch=8,
             save_every=2, oracle_steps=3, oracle_batch=4, oracle_shape_steps=3)


def rank_world() -> tuple[int, int]:
    """(rank, processes): the VAE and UNet stages can run data-parallel (`torchrun --nproc_per_node 2 -m
    unconfused toyworld train --stages unet`), each process taking a slice of every batch; same result as one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gen(s: ToySettings, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(s.seed * 1_000_003 + STAGES.index(stage) * 100_003 + step)


def _lr(base: float, step: int, total: int, warmup: int = 100) -> float:
    """Linear warm-up, then cosine down to a tenth."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _normalise(imgs: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (imgs - mean) / std


def swapped_caption(scene: tw.Scene, rng: random.Random) -> str | None:
    """The scene's caption with the objects' colours rotated (None if all share one colour)."""
    objs = scene.objects
    if len({o.colour for o in objs}) < 2:
        return None
    cols = [o.colour for o in objs]
    for _ in range(10):
        rng.shuffle(cols)
        if any(c != o.colour for c, o in zip(cols, objs)):
            break
    moved = [dataclasses.replace(o, colour=c) for o, c in zip(objs, cols)]
    return tw.describe(moved, scene.ground, random.Random(scene.caption))


class Stage:
    """A resumable loop: `state()`/`load()` hold everything a checkpoint needs."""

    name = ""

    def __init__(self, s: ToySettings, run: Path, tokenizer):
        self.s, self.run, self.tok = s, run, tokenizer
        self.ckpt = run / f"{self.name}.pt"

    def ids(self, captions: list[str]) -> torch.Tensor:
        return self.tok(captions, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids

    def loop(self, steps: int) -> None:
        start = 0
        if self.ckpt.is_file():
            st = torch.load(self.ckpt, weights_only=True)
            self.load(st)
            start = st["step"]
        t0, losses = time.time(), []
        for step in range(start, steps):
            losses.append(self.step(step))
            if ((step + 1) % self.s.save_every == 0 or step + 1 == steps) and rank_world()[0] == 0:
                tmp = self.ckpt.with_suffix(".tmp")
                torch.save({**self.state(), "step": step + 1}, tmp)
                tmp.replace(self.ckpt)
                rate = (time.time() - t0) / len(losses)
                print(f"[{self.name}] step {step + 1}/{steps} loss {sum(losses) / len(losses):.4f} "
                      f"({rate:.2f}s/step, {rate * (steps - step - 1) / 60:.1f} min left)", flush=True)
                losses = []
                t0 = time.time()


class ClipStage(Stage):
    name = "clip"

    def __init__(self, s, run, tokenizer):
        super().__init__(s, run, tokenizer)
        self.text = tw.build_text_encoder(s.seed)
        self.clip = tw.build_clip(s.seed + 1)
        self.proj = torch.nn.Parameter(torch.randn(tw.TEXT["hidden_size"], tw.CLIP_CFG["embed_dim"]) *
                                       tw.TEXT["hidden_size"] ** -0.5)
        self.scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        params = list(self.text.parameters()) + list(self.clip.visual.parameters()) + [self.proj, self.scale]
        self.opt = torch.optim.AdamW(params, lr=s.clip_lr, weight_decay=0.05)

    def step(self, step: int) -> float:
        s = self.s
        for g in self.opt.param_groups:
            g["lr"] = _lr(s.clip_lr, step, s.clip_steps)
        scenes = [tw.scene(s.seed, step * s.clip_batch + i) for i in range(s.clip_batch)]
        rng = random.Random(s.seed * 7 + step)
        negs = [swapped_caption(sc, rng) for sc in scenes]
        has_neg = [i for i, n in enumerate(negs) if n]
        captions = [sc.caption for sc in scenes] + [negs[i] for i in has_neg]
        imgs = torch.from_numpy(__import__("numpy").stack([sc.image for sc in scenes])).permute(0, 3, 1, 2)
        img_f = F.normalize(self.clip.visual(_normalise(imgs.float() / 255)), dim=-1)
        txt_f = F.normalize(self.text(self.ids(captions)).pooler_output @ self.proj, dim=-1)
        scale = self.scale.exp().clamp(max=100)
        logits = scale * img_f @ txt_f.T  # [B, B + negatives]
        n = len(scenes)
        target = torch.arange(n)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :n].T, target)) / 2
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)

    def state(self):
        return {"text": self.text.state_dict(), "clip": self.clip.state_dict(), "proj": self.proj.data,
                "scale": self.scale.data, "opt": self.opt.state_dict()}

    def load(self, st):
        self.text.load_state_dict(st["text"])
        self.clip.load_state_dict(st["clip"])
        self.proj.data.copy_(st["proj"])
        self.scale.data.copy_(st["scale"])
        self.opt.load_state_dict(st["opt"])


class _RoundTrip(torch.nn.Module):
    """Encode, sample with the given noise, decode: one module, so DDP can wrap it."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, eps):
        post = self.vae.encode(x).latent_dist
        return self.vae.decode(post.mean + post.std * eps).sample, post.kl().mean()


class VaeStage(Stage):
    name = "vae"

    def __init__(self, s, run, tokenizer):
        super().__init__(s, run, tokenizer)
        self.vae = tw.build_vae(s.seed + 2)
        self.model = _RoundTrip(self.vae)
        if rank_world()[1] > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.model)
        self.opt = torch.optim.AdamW(self.vae.parameters(), lr=s.vae_lr, weight_decay=0.0)

    def step(self, step: int) -> float:
        s = self.s
        for g in self.opt.param_groups:
            g["lr"] = _lr(s.vae_lr, step, s.vae_steps)
        import numpy as np

        scenes = [tw.scene(s.seed + 1, step * s.vae_batch + i) for i in range(s.vae_batch)]
        x = torch.from_numpy(np.stack([sc.image for sc in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
        # objects are a tenth of the pixels: weighted up, or the VAE learns the grounds long before them
        w = 1 + 9 * torch.from_numpy(np.stack([np.any(sc.masks, 0) for sc in scenes])).float()[:, None]
        eps = torch.randn(s.vae_batch, 4, tw.SIZE // 8, tw.SIZE // 8, generator=_gen(s, "vae", step))
        rank, world = rank_world()
        part = slice(rank * s.vae_batch // world, (rank + 1) * s.vae_batch // world)
        norm = w.mean()  # of the whole batch, so slices of it add up to the one-process loss
        x, w, eps = x[part], w[part], eps[part]
        rec, kl = self.model(x, eps)
        err = (rec - x) ** 2 + 0.5 * (rec - x).abs()
        loss = (w * err).mean() / norm + 1e-6 * kl
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)

    def state(self):
        return {"vae": self.vae.state_dict(), "opt": self.opt.state_dict()}

    def load(self, st):
        self.vae.load_state_dict(st["vae"])
        self.opt.load_state_dict(st["opt"])


def encode_latents(s: ToySettings, run: Path) -> None:
    """Posterior means of scenes 0..latent_scenes of world seed+2, and the VAE's scaling factor."""
    out = run / "latents.pt"
    if out.is_file():
        return
    vae = tw.build_vae()
    vae.load_state_dict(torch.load(run / "vae.pt", weights_only=True)["vae"])
    vae.eval()
    lats, caps = [], []
    with torch.no_grad():
        for start in range(0, s.latent_scenes, 64):
            imgs, c = tw.batch(s.seed + 2, start, min(64, s.latent_scenes - start))
            lats.append(vae.encode(imgs * 2 - 1).latent_dist.mean)
            caps += c
    lat = torch.cat(lats)
    scale = float(1 / lat.std())
    print(f"[latents] {len(caps)} scenes, latent std {lat.std():.3f} -> scaling factor {scale:.4f}", flush=True)
    tmp = out.with_suffix(".tmp")
    torch.save({"latents": lat * scale, "captions": caps, "scaling_factor": scale}, tmp)
    tmp.replace(out)


def frozen_text(run: Path):
    text = tw.build_text_encoder()
    text.load_state_dict(torch.load(run / "clip.pt", weights_only=True)["text"])
    return text.eval().requires_grad_(False)


class UnetStage(Stage):
    name = "unet"

    def __init__(self, s, run, tokenizer):
        super().__init__(s, run, tokenizer)
        from diffusers import DDPMScheduler

        from ..engine.models import configs

        text = frozen_text(run)
        data = torch.load(run / "latents.pt", weights_only=True)
        self.latents, self.captions = data["latents"], data["captions"]
        with torch.no_grad():  # the text tower is frozen: encode every caption once
            self.cond = torch.cat([text(self.ids(self.captions[i:i + 256]))[0]
                                   for i in range(0, len(self.captions), 256)])
            self.empty = text(self.ids([""]))[0]
        self.unet = tw.build_unet(s.seed + 3)
        self.model = self.unet
        if rank_world()[1] > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.unet)  # averages the slices' gradients
        self.ema = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=s.unet_lr, weight_decay=0.01)
        self.sched = DDPMScheduler(**configs.SCHEDULER)
        ac = self.sched.alphas_cumprod
        self.snr = ac / (1 - ac)

    def step(self, step: int) -> float:
        s = self.s
        for g in self.opt.param_groups:
            g["lr"] = _lr(s.unet_lr, step, s.unet_steps, warmup=200)
        g = _gen(s, "unet", step)
        idx = torch.randint(0, len(self.captions), (s.unet_batch,), generator=g)
        drop = torch.rand(s.unet_batch, generator=g) < 0.1  # empty captions, for classifier-free guidance
        cond = torch.where(drop.view(-1, 1, 1), self.empty, self.cond[idx])
        x0 = self.latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (s.unet_batch,), generator=g)
        xt = self.sched.add_noise(x0, noise, t)
        rank, world = rank_world()
        part = slice(rank * s.unet_batch // world, (rank + 1) * s.unet_batch // world)
        xt, t, cond, noise = xt[part], t[part], cond[part], noise[part]
        pred = self.model(xt, t, encoder_hidden_states=cond).sample
        w = (self.snr[t].clamp(max=5.0) / self.snr[t]).view(-1, 1, 1, 1)  # min-SNR-5 for epsilon
        loss = (w * (pred - noise) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        decay = min(s.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in self.unet.state_dict().items():
                if v.dtype.is_floating_point:
                    self.ema[k].mul_(decay).add_(v, alpha=1 - decay)
                else:
                    self.ema[k].copy_(v)
        return float(loss)

    def state(self):
        return {"unet": self.unet.state_dict(), "ema": self.ema, "opt": self.opt.state_dict()}

    def load(self, st):
        self.unet.load_state_dict(st["unet"])
        self.ema = st["ema"]
        self.opt.load_state_dict(st["opt"])


def _with_metadata(path: Path, meta: dict[str, str]) -> None:
    """Rewrite a safetensors file as fp16 with metadata (world seed, training settings)."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    atomic_save_safetensors(path, {k: (v.half() if v.is_floating_point() else v).contiguous()
                                   for k, v in sd.items()}, metadata=meta)


def export(s: ToySettings, run: Path, out: Path) -> Path:
    """The diffusers folder `out/toy-sd` and the open_clip file `out/toy-clip.safetensors` (+ .json)."""
    from diffusers import DDPMScheduler

    from ..engine.models import configs

    meta = {"unconfused_toyworld": "1", "world_seed": str(s.seed),
            "training_settings": json.dumps(dataclasses.asdict(s)), "world": json.dumps(
                {"size": tw.SIZE, "shapes": tw.SHAPES, "colours": list(tw.COLOURS), "patterns": tw.PATTERNS,
                 "sizes": list(tw.SIZES), "grounds": list(tw.GROUNDS), "held_out": tw.HELD_OUT})}
    clip_st = torch.load(run / "clip.pt", weights_only=True)
    text = tw.build_text_encoder()
    text.load_state_dict(clip_st["text"])
    vae = tw.build_vae()
    vae.load_state_dict(torch.load(run / "vae.pt", weights_only=True)["vae"])
    vae.register_to_config(scaling_factor=torch.load(run / "latents.pt", weights_only=True)["scaling_factor"])
    unet = tw.build_unet()
    unet.load_state_dict(torch.load(run / "unet.pt", weights_only=True)["ema"])
    folder = out / "toy-sd"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").unlink(missing_ok=True)
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        m.save_pretrained(folder / name)
        for f in (folder / name).glob("*.safetensors"):
            _with_metadata(f, meta)
    DDPMScheduler(**configs.SCHEDULER).save_pretrained(folder / "scheduler")
    atomic_write_json(folder / "model_index.json", {"_class_name": "StableDiffusionPipeline",
                                                    "_unconfused_toyworld": True, "world_seed": s.seed})
    # the open_clip file: trained image tower, the SD text encoder as text tower, the projection
    clip = tw.build_clip()
    clip.load_state_dict(clip_st["clip"])
    sd = {k: v for k, v in clip.state_dict().items() if k.startswith("visual.")}
    sd.update(tw.open_clip_text_state(text))
    sd["text_projection"] = clip_st["proj"].clone()
    sd["logit_scale"] = clip_st["scale"].clone().clamp(max=math.log(100))
    if "attn_mask" in clip.state_dict():
        sd["attn_mask"] = clip.state_dict()["attn_mask"]
    atomic_write_json(out / f"{tw.CLIP_NAME}.json", tw.CLIP_CFG)
    atomic_save_safetensors(out / f"{tw.CLIP_NAME}.safetensors",
                            {k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous()
                             for k, v in sd.items()}, metadata=meta)
    return out


def oracle_stage(s: ToySettings, run: Path, out: Path, validate: int = 256) -> dict:
    """Train the oracle, measure it on held-out renders (exact and through the VAE), save it."""
    import numpy as np

    from ..engine.evaluation import oracle as O

    vae = None
    if (run / "vae.pt").is_file():
        vae = tw.build_vae()
        vae.load_state_dict(torch.load(run / "vae.pt", weights_only=True)["vae"])
        vae.eval().requires_grad_(False)
        if (run / "latents.pt").is_file():
            vae.register_to_config(scaling_factor=torch.load(run / "latents.pt", weights_only=True)["scaling_factor"])
    say = (lambda m: print(m, flush=True))
    pixel_ckpt = run / "oracle_pixels.pt"  # the pixel net is done once; a rerun goes on with the shapes
    if pixel_ckpt.is_file():
        net = O.OracleNet()
        net.load_state_dict(torch.load(pixel_ckpt, weights_only=True))
        net.eval()
    else:
        net = O.train_oracle(steps=s.oracle_steps, batch=s.oracle_batch, seed=s.seed, vae=vae, log=say)
        tmp = pixel_ckpt.with_suffix(".tmp")  # whole or not at all, as the stages' checkpoints
        torch.save(net.state_dict(), tmp)
        tmp.replace(pixel_ckpt)
    oracle = O.Oracle(net)
    oracle.shape_net = O.train_shape_net(oracle, steps=s.oracle_shape_steps, batch=s.oracle_batch, seed=s.seed,
                                         vae=vae, log=say).requires_grad_(False)
    held = [O.oracle_scene(s.seed + 10_000, i) for i in range(validate)]  # another seed: never trained on
    acc = {"renders": O.score_renders(oracle, held)}
    if vae is not None:
        x = torch.from_numpy(np.stack([sc.image for sc in held])).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            rec = torch.cat([((vae.decode(vae.encode(x[i:i + 32] * 2 - 1).latent_dist.mean).sample + 1) / 2)
                             .clamp(0, 1) for i in range(0, len(x), 32)])
        acc["vae_round_trip"] = O.score_renders(oracle, held, rec.permute(0, 2, 3, 1))
    print(f"[oracle] held-out accuracy {json.dumps(acc)}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    oracle.save(out / "oracle.safetensors", metadata={
        "world_seed": str(s.seed), "training_settings": json.dumps({"steps": s.oracle_steps, "shape_steps": s.oracle_shape_steps,
                                                                    "batch": s.oracle_batch,
                                                                    "vae_round_trip": vae is not None}),
        "held_out_accuracy": json.dumps(acc)})
    return acc


def train(s: ToySettings, run: Path, out: Path, stages: tuple[str, ...] = STAGES) -> Path:
    from ..engine.models.clip_tokenizer import clip_tokenizer

    torch.manual_seed(s.seed)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "settings.json", dataclasses.asdict(s))
    tok = clip_tokenizer()
    if rank_world()[1] > 1 and set(stages) - {"unet", "vae"}:
        raise SystemExit("several processes train only the VAE and UNet stages: add --stages vae or unet")
    if "clip" in stages:
        ClipStage(s, run, tok).loop(s.clip_steps)
    if "vae" in stages:
        VaeStage(s, run, tok).loop(s.vae_steps)
    if "latents" in stages:
        encode_latents(s, run)
    if "unet" in stages:
        UnetStage(s, run, tok).loop(s.unet_steps)
    if "export" in stages:
        export(s, run, out)
        print(f"[export] written to {out}", flush=True)
    if "oracle" in stages:
        oracle_stage(s, run, out)
    return out


def main(args) -> int:
    s = ToySettings(**(QUICK if args.quick else {}))
    for kv in args.set:
        k, v = kv.split("=", 1)
        setattr(s, k, type(getattr(s, k))(v))
    if args.threads:
        torch.set_num_threads(args.threads)
    if int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    train(s, Path(args.workdir), Path(args.out) if args.out else tw.WEIGHTS_DIR, stages)
    return 0
