"""CLIF text-encoder trainer (paper 4.2): contrastive fine-tuning that separates the concept tokens.

Every augmented pair (image, caption) of the CLIF dataset is one positive; the other pairs of
the (global) batch are the negatives. Text features are the SD text encoder's pooled output
(the hidden state at the first end-of-text token, after the final layer norm) through CLIP's
text projection; image features come from the matching frozen CLIP image tower
(`engine/vision/clip_image_tower.py`). The loss is CLIP's symmetric InfoNCE with CLIP's own logit scale:

    logits = s * normalize(T) @ normalize(I).T,  loss = (CE(logits, i) + CE(logits.T, i)) / 2

What trains (`train`):
- `tokens`: only the new concept token rows (what the public CLIF code does).
- `tokens+lora` (default): the rows + a LoRA on the text encoder's attention projections.
- `tokens+full`: the rows + every text-encoder weight except the frozen base token table (the
  paper's "fine-tune the text encoder"); the vocabulary's own rows stay as they are.

The image tower never trains, so its features are computed once and cached on disk by image
content (`FeatureCache`); `cache_features = False` re-encodes each batch (the reference
design; kept for the benchmark). The batch is drawn from the step number alone (an epoch-wise
permutation seeded by (seed, epoch)), so resume and several processes agree without any state.

Several processes (torchrun): each rank encodes its slice of the global batch; the text
features are all-gathered with gradient (`torch.distributed.nn.functional.all_gather`, as
open_clip's gather_features), every rank computes the loss of the whole global batch, and the
gradients are averaged - so N ranks x batch B equals one process with batch N*B.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine import host, presets
from ..engine.vision.clip_image_tower import (
    FeatureCache,
    ImageTower,
    check_pair,
    file_hash,
    load_image_tower,
    tower_from_scorer,
)
from ..engine.data.augmented_dataset import Dataset, record_kinds
from ..engine.errors import UnconfusedError
from ..engine.models.exports import export_name, save_lora, save_text_encoder
from ..engine.files import atomic_save_image, atomic_write_json
from ..engine.models.loading import add_text_encoder_lora, move_module
from ..engine.preview import line_chart
from ..engine.settings import check_declared, setting
from ..engine.models.concept_tokens import add_concept_tokens, concept_embedding, expand_prompt
from .base import LR_SCHEDULERS, OPTIMIZERS, PRECISIONS, RESUME  # noqa: F401 (the nodes' and CLI's choices)
from .base import TrainerCore, check_common, first_folder, run_trainer
from .loop import settings_from_dict

log = logging.getLogger("unconfused")
NODE = "UnconfusedTrainCLIF"
TRAIN_MODES = ["tokens", "tokens+lora", "tokens+full"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
NOT_HASHED = {"checkpoint_every", "keep_checkpoints", "resume", "export", "device", "name", "cache_features",
              "probe_template", "eval_every", "preset"}  # preset: its values are hashed


@dataclass
class ClifSettings:
    name: str = setting("clif", tip='Run name: the run folder under output/unconfused/runs and the exported file '
                                    'names. Same name + same settings = resume')
    preset: str = setting("custom", choices=presets.choices("clif"), tip='custom: the widgets as they are. paper: '
        "the paper's recipe; quick: a budget that finishes well under an hour on a 12 GB GPU. With a preset, the "
        'preset sets every setting it lists except a widget you changed from its default: that value wins '
        "(docs/presets.md lists the values and their sources). paper = CLIF stage 1 at the paper's scale")
    train: str = setting("tokens+lora", choices=TRAIN_MODES, tip='tokens: only the new token rows (the public CLIF '
        "code); tokens+lora: rows + a text-encoder LoRA; tokens+full: rows + every text-encoder weight (the paper's "
        'wording)')
    steps: int = setting(1000, min=1, ui_max=1000000, tip='Optimizer steps')
    batch_size: int = setting(32, min=1, ui_max=4096, tip='Pairs per step and process; the contrastive batch (the '
                                                          'negatives) is batch_size x processes')
    gradient_accumulation: int = setting(1, min=1, ui_max=64, tip='Batches per optimizer step (each batch is its own '
        'contrastive batch)')
    learning_rate: float = setting(1e-4, min=0.0, ui_max=0.1, step=1e-05, tip='Text-encoder LoRA / weights')
    token_lr: float = setting(1e-4, min=0.0, ui_max=0.1, step=1e-05, tip='Concept token rows')
    rank: int = setting(8, min=1, ui_max=256, tip='Text-encoder LoRA rank')
    alpha: float = setting(8.0, min=0.1, ui_max=512, step=0.1, tip='LoRA alpha (scale = alpha / rank)')
    dropout: float = setting(0.0)
    vectors_per_token: int = setting(1, min=1, ui_max=16, tip='Embedding vectors per concept token, each initialised '
        'from the class word')
    kinds: str = setting("global,region,mix,photo", tip='Which pairs to train on (comma separated: global, region, '
                                                        'mix, photo)')
    holdout: float = setting(0.05, min=0.0, ui_max=0.5, step=0.01, tip='Share of pairs held out for the retrieval '
        'metric')
    cache_features: bool = setting(True, tip='Encode every image once and train on the cached features (on disk, by '
                                             'content)')
    probe_template: str = setting("a photo of {token}", tip='the prompt of the concept-similarity metric')
    precision: str = setting("auto", choices=PRECISIONS, tip='Frozen weights: auto = bf16/fp16 on a GPU, fp32 on the '
        'CPU; trained weights stay fp32; fp16 adds a gradient scaler')
    optimizer: str = setting("adamw", choices=OPTIMIZERS, tip='adamw8bit needs bitsandbytes and a CUDA GPU')
    lr_scheduler: str = setting("constant_with_warmup", choices=LR_SCHEDULERS, tip="Learning-rate schedule")
    warmup_steps: int = setting(50, min=0, ui_max=100000, tip='Learning-rate warm-up steps')
    weight_decay: float = setting(1e-2)
    max_grad_norm: float = setting(1.0)
    seed: int = setting(0, min=0, ui_max=2147483647, tip='Seeds the order of the pairs')
    checkpoint_every: int = setting(200, min=0, ui_max=1000000, tip='Save a resumable checkpoint every N steps (0 = '
        'only on Cancel or at the end)')
    keep_checkpoints: int = setting(2)
    eval_every: int = setting(0, min=0, ui_max=1000000, tip='Held-out metrics every N steps (0 = before and after '
        'only)')
    resume: str = setting("auto", choices=RESUME, tip="auto: continue from the run's last checkpoint when the "
                                                      'settings match; restart: start over')
    export: bool = setting(True, tip='Write embeddings, the text encoder and the text-encoder LoRA into the model '
                                     'folders')
    device: str = setting("auto", choices=host.DEVICE_CHOICES, tip='auto: the GPU ComfyUI uses (cuda or mps), else the CPU')

    @classmethod
    def from_dict(cls, data: dict) -> "ClifSettings":
        return settings_from_dict(cls, data)

    def validated(self) -> "ClifSettings":
        def bad(input: str, msg: str):
            raise UnconfusedError(msg, input=input)

        check_common(self, ("learning_rate", "token_lr"))
        if self.batch_size < 1:
            bad("batch_size", "must be at least 1 (the contrastive batch is batch_size x processes, at least 2)")
        if self.gradient_accumulation < 1:
            bad("gradient_accumulation", "must be at least 1")
        if self.vectors_per_token < 1:
            bad("vectors_per_token", "must be at least 1")
        if not 0 <= self.holdout < 0.9:
            bad("holdout", "must be between 0 and 0.9 (e.g. 0.05 = 5% of the pairs)")
        unknown = [k for k in self.kind_list() if k not in record_kinds()]
        if unknown or not self.kind_list():
            bad("kinds", f"{unknown or 'nothing'} - name pair kinds from {record_kinds()}, comma separated")
        if "{token}" not in self.probe_template:
            bad("probe_template", "must contain {token} (e.g. 'a photo of {token}')")
        check_declared(self)
        return self

    def kind_list(self) -> list[str]:
        return [k.strip() for k in self.kinds.split(",") if k.strip()]

    def hashed(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in NOT_HASHED}


@dataclass
class ClifResult:
    bundle: object  # the ModelBundle with the fine-tuned text encoder (tokens added)
    losses: list[float]
    run_dir: Path
    metrics: dict
    exports: dict[str, Path] = field(default_factory=dict)
    loss_curve: object = None  # PIL image
    resumed_from: int = 0

    def info(self) -> str:
        m = self.metrics
        lines = [f"CLIF: trained {len(self.losses)} steps" + (f" (resumed from {self.resumed_from})"
                                                               if self.resumed_from else ""),
                 f"loss: first {self.losses[0]:.4f}, last (mean of 20) "
                 f"{sum(self.losses[-20:]) / len(self.losses[-20:]):.4f}" if self.losses else "no steps"]
        b, a = m.get("before", {}), m.get("after", {})
        if "max_pair_cosine" in a:
            lines.append(f"concept text features, largest pairwise cosine: {b.get('max_pair_cosine', float('nan')):.3f}"
                         f" -> {a['max_pair_cosine']:.3f} (lower = better separated)")
        if a.get("heldout_pairs"):
            lines.append(f"held-out ({a['heldout_pairs']} pairs): image->text top-1 {b.get('i2t_top1', 0):.2f} -> "
                         f"{a['i2t_top1']:.2f}, concept accuracy {b.get('concept_accuracy', 0):.2f} -> "
                         f"{a.get('concept_accuracy', 0):.2f} (chance {a.get('concept_chance', 0):.2f})")
        else:
            lines.append("no held-out pairs (raise holdout for retrieval metrics)")
        for key, path in self.exports.items():
            if key.startswith("embedding:"):
                lines.append(f"{key[len('embedding:'):]} -> write embedding:{path.stem} in stock ComfyUI prompts")
            elif key == "text_encoder":
                lines.append(f"text encoder: {path.parent.name}/{path.name} (stock CLIPLoader, type stable_diffusion; "
                             "use it with the embeddings)")
            elif key == "lora":
                lines.append(f"text-encoder LoRA: loras/{path.name} (stock LoraLoader, strength_clip; the UNet part "
                             "is empty)")
        return "\n".join(lines)


# ---------------------------------------------------------------- helpers
def gather_with_grad(t: torch.Tensor, size: int) -> torch.Tensor:
    """All ranks' rows, in rank order, with gradient flowing back to this rank's rows."""
    if size == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


def gather_plain(t: torch.Tensor, size: int) -> torch.Tensor:
    if size == 1:
        return t
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def clip_loss(text: torch.Tensor, image: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE of matching rows (CLIP's loss)."""
    logits = scale * text @ image.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def is_held_out(record_id: str, share: float) -> bool:
    """A pair is held out by its id alone, so the split never changes as a dataset grows."""
    return int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16) / 2**32 < share


def merged_text_encoder(te: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of a text encoder with its peft LoRA merged into new weight tensors; the
    frozen tensors stay shared (never written to) and the input model is unchanged."""
    from peft.tuners.lora import LoraLayer

    memo = {id(t): t for n, t in list(te.named_parameters()) + list(te.named_buffers()) if "lora_" not in n}
    with torch.inference_mode(False):
        out = copy.deepcopy(te, memo)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, LoraLayer):
            base = mod.get_base_layer()
            with torch.no_grad():
                delta = mod.get_delta_weight("default").to(base.weight.dtype)
                base.weight = torch.nn.Parameter(base.weight.detach() + delta, requires_grad=False)
            parent = out.get_submodule(name.rsplit(".", 1)[0]) if "." in name else out
            setattr(parent, name.rsplit(".", 1)[-1], base)
    for attr in ("peft_config",):
        if attr in out.__dict__:
            del out.__dict__[attr]
    if hasattr(out, "_hf_peft_config_loaded"):
        out._hf_peft_config_loaded = False
    return out.requires_grad_(False).eval()


class _StockTextEncoder:
    """What `save_text_encoder` reads, with the vocabulary's own token table only (49408 rows):
    stock CLIPLoader loads the file into a fixed-size model; the concept rows go into the
    embedding files (`embedding:<name>_<token>` in the prompt)."""

    def __init__(self, te):
        self._te = te

    def state_dict(self):
        return self._te.state_dict()

    def get_input_embeddings(self):
        return concept_embedding(self._te).base


# ---------------------------------------------------------------- the trainer
class ClifTrainer(TrainerCore):
    """Set up once, then `run()`. Usable from Python, the CLI and the node."""
    node = NODE

    kind = "clif"

    def __init__(self, bundle, dataset: Dataset | str | Path, tower: ImageTower | object, settings: ClifSettings,
                 *, class_words: dict[str, str] | None = None, run_root: Path | None = None):
        super().__init__(settings, run_root=run_root)
        if isinstance(dataset, (str, Path)):
            dataset = Dataset(dataset)
        if not isinstance(dataset, Dataset):
            raise UnconfusedError("connect an augmented dataset (CLIF Augmentation Builder or Load Augmented "
                                  "Dataset)", input="dataset")
        self.dataset = dataset
        if not isinstance(tower, ImageTower):
            if hasattr(tower, "model") and hasattr(tower, "image_size"):  # a CLIP Scorer (UNCONFUSED_CLIP)
                tower = tower_from_scorer(tower, input="clip_model")
            else:
                raise UnconfusedError("no CLIP image tower: choose image_tower (a file of models/clip_vision) or "
                                      "connect a CLIP Scorer Loader", input="image_tower")
        self.tower = tower
        self.class_words = {c.get("token"): c.get("class_word", "") for c in dataset.concepts if c.get("token")}
        self.class_words.update({k: v for k, v in (class_words or {}).items() if v})
        with host.training_mode():
            self._setup(bundle)

    # ------------------------------------------------------------ setup
    def _setup(self, bundle) -> None:
        s = self.settings
        host.free_memory_for_training()
        records = self.dataset.of_kind(*s.kind_list())
        if not records:
            raise UnconfusedError(f"the dataset {self.dataset.folder.name} has no pairs of kinds {s.kind_list()} "
                                  f"(it has {self.dataset.manifest.get('counts')}); change kinds",
                                  input="kinds")
        held = [r for r in records if is_held_out(r.id, s.holdout)]
        train = [r for r in records if not is_held_out(r.id, s.holdout)]
        if len(train) < 2:
            raise UnconfusedError(f"only {len(train)} training pair(s) after holding out {len(held)}; a contrastive "
                                  "batch needs at least 2 - build more pairs or lower holdout",
                                  input="holdout")
        if s.batch_size * self.world.size < 2:
            raise UnconfusedError("a contrastive batch needs at least 2 pairs (the others are the negatives); raise "
                                  "batch_size", input="batch_size")
        if s.batch_size * self.world.size > len(train):
            raise UnconfusedError(f"the contrastive batch ({s.batch_size} x {self.world.size} processes) is larger "
                                  f"than the {len(train)} training pairs; lower batch_size",
                                  input="batch_size")
        tokens = list(dict.fromkeys(t for r in records for t in r.tokens))
        if not tokens:
            raise UnconfusedError("the dataset's pairs name no concept tokens; build it with the CLIF Augmentation "
                                  "Builder", input="dataset")
        missing = [t for t in tokens if not self.class_words.get(t) and t not in bundle.added_tokens]
        if missing:
            raise UnconfusedError(f"no class word for {missing}: the dataset's manifest does not name it and the "
                                  "model does not know the token; connect the concept set the dataset was built "
                                  "from", input="concept_set")
        self.train_records, self.held_records, self.tokens = train, held, tokens

        bundle = bundle.clone()  # the input bundle stays as it was
        if s.train == "tokens+full":  # every text-encoder weight trains: a private copy, nothing shared
            with torch.inference_mode(False):
                bundle.text_encoder = copy.deepcopy(bundle.text_encoder)
        add_concept_tokens(bundle, [(t, self.class_words.get(t, "")) for t in tokens], s.vectors_per_token, input="dataset")
        te = bundle.text_encoder
        width = te.config.hidden_size
        check_pair(self.tower, width, bundle.family,
                   input="image_tower")
        self.family = bundle.spec
        # frozen weights in the run's precision (tokens+full trains them all: fp32); what trains is
        # upcast to fp32 by configure_optimizer, after everything that trains is known
        move_module(te, self.device, torch.float32 if s.train == "tokens+full" else self.weight_dtype)
        te.requires_grad_(False)
        emb = concept_embedding(te)
        groups = [{"params": [emb.new_rows], "lr": s.token_lr}]
        if s.train == "tokens+lora":
            from peft import LoraConfig

            add_text_encoder_lora(te, LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout,
                                                 init_lora_weights=True, target_modules=TEXT_TARGETS))
            groups.append({"params": [p for n, p in te.named_parameters() if "lora_" in n], "lr": s.learning_rate})
        elif s.train == "tokens+full":
            full = [p for n, p in te.named_parameters() if "token_embedding" not in n]
            for p in full:
                p.requires_grad_(True)
            groups.append({"params": full, "lr": s.learning_rate})
        emb.new_rows.requires_grad_(True)  # after add_adapter, which freezes everything but the LoRA
        self.bundle = bundle
        self.proj = host.detach_clone(self.tower.text_projection).to(self.device)  # used in autograd
        self.eos = int(bundle.tokenizer.eos_token_id)
        self.configure_optimizer({f"text_encoder.{n}": p for n, p in te.named_parameters() if p.requires_grad},
                                 groups, weight_decay=s.weight_decay, warmup_steps=min(s.warmup_steps, s.steps))

        # image features: content keys, then the cache (rank 0 encodes what is missing, the others read)
        self.cache = FeatureCache(self.tower)
        self.keys = content_keys(self.dataset.folder, [r.image for r in train + held], self.cache.folder.parent)
        self.train_keys, self.held_keys = self.keys[:len(train)], self.keys[len(train):]
        self.features = None
        if s.cache_features:
            if self.world.is_main:
                self.cache.features(self.keys, self._load_image, device=self.device, dtype=self.weight_dtype)
            self.world.barrier()
            self.cache._loaded = False
            self.features = self.cache.features(self.train_keys, self._load_image, device=self.device,
                                                write=False).to(self.device)
        self._perms: dict[int, torch.Tensor] = {}
        self._ids: dict[str, torch.Tensor] = {}
        config = {"settings": s.hashed(), "base": bundle.base_hash, "family": bundle.family,
                  "tower": self.tower.tower_hash, "tokens": tokens,
                  "data": hashlib.sha256(json.dumps([[r.id, r.caption] for r in train] + self.keys)
                                         .encode()).hexdigest()[:16]}
        self.make_loop(config)
        self.metrics: dict = {"before": self.evaluate(), "history": []}

    def _load_image(self, i: int) -> torch.Tensor:
        recs = self.train_records + self.held_records
        return self.dataset.image(recs[i])

    # ------------------------------------------------------------ features
    def text_features(self, captions: list[str]) -> torch.Tensor:
        """Normalised CLIP text features [B, E] of captions through the SD text encoder."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._ids]
        if missing:
            ids = self.bundle.tokenize([expand_prompt(self.bundle, c) for c in missing])
            self._ids.update(zip(missing, ids))
        ids = torch.stack([self._ids[c] for c in captions]).to(self.device)
        with self.precision.autocast():
            hidden = self.family.contrastive_hidden(self.bundle, ids)  # after the final layer norm
        # pooled = the first end-of-text token (not argmax of ids: added tokens have larger ids)
        pos = (ids == self.eos).int().argmax(dim=-1)
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), pos].float()
        return F.normalize(pooled @ self.proj, dim=-1)

    def _indices(self, step: int, micro: int) -> torch.Tensor:
        """The global batch of a (step, micro-batch): sample k of the run is perm_e[k mod N],
        perm_e a permutation seeded by (seed, epoch e) - a function of the step number alone."""
        s, n = self.settings, len(self.train_records)
        g = s.batch_size * self.world.size
        start = (step * s.gradient_accumulation + micro) * g
        out = []
        for k in range(start, start + g):
            e = k // n
            if e not in self._perms:
                self._perms = {k2: v for k2, v in self._perms.items() if k2 >= e - 1}
                self._perms[e] = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed * 1000003 + e))
            out.append(int(self._perms[e][k % n]))
        return torch.tensor(out)

    def _image_features(self, gidx: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
        if self.features is not None:
            return self.features[gidx.to(self.features.device)]
        # the reference design: encode this rank's images now, then share them
        self.tower.to(self.device)
        local = self.tower.encode([self._load_image(int(i)) for i in mine], device=self.device).to(self.device)
        return gather_plain(local, self.world.size)

    # ------------------------------------------------------------ one step
    def micro_batch_loss(self, step: int, micro: int) -> torch.Tensor:
        gidx = self._indices(step, micro)
        mine = self.world.mine(gidx, self.settings.batch_size)
        img = self._image_features(gidx, mine)
        txt = gather_with_grad(self.text_features([self.train_records[i].caption for i in mine.tolist()]),
                               self.world.size)
        return clip_loss(txt, img, self.tower.logit_scale)

    def _on_step(self, step: int, loss: float) -> None:
        s = self.settings
        if s.eval_every and step % s.eval_every == 0 and step < s.steps:
            m = self.evaluate()
            m["step"] = step
            self.metrics["history"].append(m)

    # ------------------------------------------------------------ metrics
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Concept separation (pairwise cosine of the probe prompts' text features) and held-out
        retrieval: image->text top-1 among the held-out captions (a caption with the same text
        counts as right), text->image top-1, and concept accuracy - for held-out pairs with one
        concept, whether its probe prompt scores highest among all concepts' probes."""
        s = self.settings
        te = self.bundle.text_encoder
        was = te.training
        te.eval()
        try:
            probes = self.text_features([s.probe_template.format(token=t) for t in self.tokens])
            cos = (probes @ probes.T).cpu()
            out: dict = {"tokens": list(self.tokens), "pair_cosine": [[round(float(v), 5) for v in row]
                                                                       for row in cos]}
            if len(self.tokens) > 1:
                off = cos[~torch.eye(len(self.tokens), dtype=torch.bool)]
                out["max_pair_cosine"] = float(off.max())
                out["mean_pair_cosine"] = float(off.mean())
            out["heldout_pairs"] = len(self.held_records)
            if self.held_records:
                if self.features is not None or self.settings.cache_features:
                    img = self.cache.features(self.held_keys, lambda i: self._load_image(len(self.train_records) + i),
                                              device=self.device, write=False)
                else:
                    img = self.tower.encode([self._load_image(len(self.train_records) + i)
                                             for i in range(len(self.held_records))], device=self.device)
                img = img.to(self.device)
                caps = [r.caption for r in self.held_records]
                txt = self.text_features(caps)
                sim = img @ txt.T
                i2t = [caps[int(j)] == caps[i] for i, j in enumerate(sim.argmax(dim=1))]
                t2i = [caps[int(j)] == caps[i] for i, j in enumerate(sim.argmax(dim=0))]
                out["i2t_top1"] = sum(i2t) / len(i2t)
                out["t2i_top1"] = sum(t2i) / len(t2i)
                out["i2t_chance"] = sum(caps.count(c) for c in caps) / len(caps) ** 2
                single = [(i, r.tokens[0]) for i, r in enumerate(self.held_records) if len(set(r.tokens)) == 1]
                if single and len(self.tokens) > 1:
                    best = (img[[i for i, _ in single]] @ probes.T).argmax(dim=1).tolist()
                    out["concept_accuracy"] = sum(self.tokens[b] == t for b, (_, t) in zip(best, single)) / len(single)
                    out["concept_pairs"] = len(single)
                    out["concept_chance"] = 1 / len(self.tokens)
        finally:
            te.train(was)
        return out

    # ------------------------------------------------------------ run
    def train_mode(self, on: bool) -> None:
        s = self.settings
        self.bundle.text_encoder.train(on and (s.dropout > 0 or s.train != "tokens"))

    def after_training(self) -> None:
        self.metrics["after"] = self.evaluate()

    def finish(self, start: int) -> ClifResult:
        s = self.settings
        te = self.bundle.text_encoder
        self.metrics["losses"] = {"first": self.loop.losses[0] if self.loop.losses else None,
                                  "last": self.loop.losses[-1] if self.loop.losses else None}
        curve = line_chart(self.loop.losses, f"{self.node} contrastive loss ({s.name})")
        if self.world.is_main:
            atomic_save_image(self.run_dir / "loss.png", curve)
            atomic_write_json(self.run_dir / "metrics.json", self.metrics)
        exports = self.export() if s.export and self.world.is_main else {}
        if s.train == "tokens+lora":  # the output model carries plain (merged) weights: it flows on anywhere
            self.bundle.text_encoder = merged_text_encoder(te)
        self.bundle.notes.append(f"CLIF text encoder ({s.train}, {len(self.loop.losses)} steps, run {s.name})")
        self.world.barrier()
        move_module(self.bundle.text_encoder, "cpu", next(self.bundle.unet.parameters()).dtype)
        self.tower.to("cpu")
        host.empty_cache()
        return ClifResult(self.bundle, list(self.loop.losses), self.run_dir, self.metrics, exports, curve, start)

    def metadata(self) -> dict:
        return dict(self.base_metadata(), unconfused_clif_train=self.settings.train,
                    unconfused_image_tower=self.tower.model_name, unconfused_tower_hash=self.tower.tower_hash)

    def export(self) -> dict[str, Path]:
        """Embeddings (one file per token, models/embeddings/<name>_<token>.safetensors); with a
        trained encoder also the text encoder (HF `text_model.*`, models/text_encoders or clip)
        and, for tokens+lora, the text-encoder LoRA in kohya form (models/loras/<name>_te)."""
        s = self.settings
        name = export_name(s.name)
        out = self.export_embeddings(name)
        te = self.bundle.text_encoder
        if s.train == "tokens+lora":
            out["lora"] = save_lora(first_folder("loras") / f"{name}_te.safetensors", None, te,
                                    alpha=s.alpha, metadata=self.metadata(), family=self.bundle.family)
            te = merged_text_encoder(te)
        if s.train != "tokens":
            out["text_encoder"] = save_text_encoder(first_folder(host.text_encoder_folder_kind()) /
                                                    f"{name}.safetensors", _StockTextEncoder(te),
                                                    metadata=self.metadata())
        return out


def content_keys(folder: Path, rel_paths: list[str], index_root: Path) -> list[str]:
    """sha256 (32 hex) of each image file, remembered by (path, size, mtime) in a small index so a
    resume does not read every image again."""
    folder = Path(folder)
    index_file = index_root / "index" / (hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16] + ".json")
    try:
        index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    except (OSError, json.JSONDecodeError):
        index = {}
    out, changed = [], False
    for rel in rel_paths:
        p = folder / rel
        try:
            st = p.stat()
        except OSError as e:
            raise UnconfusedError(f"the dataset image {rel} is missing ({e.strerror}); build the dataset again", input="dataset") from e
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        hit = index.get(rel)
        if hit and hit[0] == stamp:
            out.append(hit[1])
        else:
            key = file_hash(p)
            index[rel] = [stamp, key]
            out.append(key)
            changed = True
    if changed:
        with contextlib.suppress(OSError):
            atomic_write_json(index_file, index)
    return out


def resolve_tower(image_tower: str | None, clip_model=None) -> ImageTower:
    if clip_model is not None:
        return tower_from_scorer(clip_model, input="clip_model")
    return load_image_tower(image_tower or "", input="image_tower")


def train_clif(bundle, dataset, tower, settings: ClifSettings | dict | None = None, **kwargs) -> ClifResult:
    """Train and export; `settings` as ClifSettings or a dict (the CLI's config file)."""
    return run_trainer(ClifTrainer, ClifSettings, settings, bundle, dataset, tower, **kwargs)
