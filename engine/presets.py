"""Training presets as data: each paper's recipe (`paper`), a budget for a 12 GB GPU (`quick`), and
`custom` (no values: every setting free, today's defaults). Every value carries its source and, where
we depart from the paper on purpose, why.

A preset is a table of setting -> value for one trainer kind ("lora": concept tokens + one shared UNet
LoRA; "clif": CLIF stage-1 text-encoder fine-tuning; "em": the mask EM). Applying one: the preset's
values first, then every setting the user gave explicitly wins (`apply_preset`). The settings record
which preset they came from (`preset` field); `effective` says for every setting whether its value is
the default, the preset's or the user's, and `record` / `export_metadata` is what the run folder and
the exported files keep. docs/presets.md is generated from the tables here (scripts/gen_docs.py presets).

The lora trainer runs two papers' methods, so it has two paper presets: `paper` = CLIF stage 2 (the
pack's main path: the model from the CLIF trainer, tokens + shared LoRA), `paper-sid` = the SID paper's
DreamBooth with prior preservation (appendix C.2). The EM trainer's `paper` is Rahman et al. with the
losses and phases of Break-a-Scene it builds on.

No ComfyUI and no trainer import: the settings classes are passed in.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from . import host
from .errors import UnconfusedError

CUSTOM = "custom"
PRESET_TOOLTIP = ("custom: the widgets as they are. paper: the paper's recipe; quick: a budget that finishes well "
                  "under an hour on a 12 GB GPU. With a preset, the preset sets every setting it lists except a "
                  "widget you changed from its default: that value wins (docs/presets.md lists the values and "
                  "their sources)")


@dataclass(frozen=True)
class Value:
    value: Any
    source: str  # paper section / table / reference code, or "ours: why"
    deviation: str = ""  # why this departs on purpose from the paper ("" = it does not)


V = Value
CLIF_APP = "CLIF appendix (Implementation Details)"
CLIF_CODE = "CLIF reference code (notes/methods.md)"
BAS = "Break-a-Scene code (notes/methods.md), which Rahman et al. follow ('similar to [4]', Sec. 3)"
CUTLER = "CutLER maskcut/crf.py, adopted by Rahman et al. Sec. 3"
SPEED = "about 1 s per SD1.5 LoRA step at 512 px on an RTX 3080-class card (kohya's figure, notes/methods.md)"

# what each preset is, in one line (docs and the record)
ABOUT = {
    ("lora", "paper"): "CLIF stage 2 (paper 4.3 + appendix): text encoder frozen (from the CLIF trainer), token "
                       "rows + one LoRA on every UNet attention, full-image loss. The paper gives its time (10 h on "
                       "4x A100 for 18 concepts), not a step count: `steps` stays yours (default 800).",
    ("lora", "paper-sid"): "SID (appendix C.2): DreamBooth with class prior preservation and text-encoder "
                           "training, 1000 iterations at batch 1, on the concepts' SID captions.",
    ("lora", "quick"): f"A run of about 10 minutes on a 12 GB GPU ({SPEED}).",
    ("clif", "paper"): "CLIF stage 1 (paper 4.1-4.2 + appendix, reference code): contrastive fine-tuning of the "
                       "text encoder on G-Aug and R-Aug pairs at the paper's scale.",
    ("clif", "quick"): "Token rows only (the public code's mode) with a short schedule: minutes with cached "
                       "image features.",
    ("em", "paper"): "Rahman et al. (Sec. 3) with Break-a-Scene's losses and two phases: masks from 50 "
                     "timesteps, fixed threshold, DenseCRF at image size with CutLER's parameters. Not yet a "
                     "setting: the paper's final stage with the masks held fixed.",
    ("em", "quick"): "Half of the paper's schedule with fewer, cheaper mask rounds: about 10 minutes.",
}

PRESETS: dict[str, dict[str, dict[str, Value]]] = {
    "lora": {
        "paper": {
            "rank": V(8, f"{CLIF_APP}: LoRA rank r = 8 (the reference code uses 16)"),
            "alpha": V(8.0, "ours: the paper gives no alpha; alpha = rank keeps the LoRA scale at 1 (plain LoRA)"),
            "target_modules": V("to_q,to_k,to_v,to_out.0", f"{CLIF_APP}: the linear layers of all U-Net attention "
                                f"modules; {CLIF_CODE}: attn1 and attn2"),
            "unet_lr": V(2e-4, f"{CLIF_APP}: Adam, learning rate 2e-4 for the diffusion model parameters"),
            "token_lr": V(2e-4, f"{CLIF_APP}: the same 2e-4 for the text embeddings"),
            "train_tokens": V(True, f"{CLIF_APP}: the text embedding is tuned along with the LoRA"),
            "text_encoder_lora": V(False, "CLIF 4.3: 'we freeze the text encoder'"),
            "masked_loss": V(False, "CLIF 4.3: plain reconstruction of the photos and M-Aug pairs; no masks in "
                             "stage 2"),
            "captions": V("template", f"{CLIF_CODE}: captions are templates around the concept tokens"),
            "template": V("a photo of {token}", f"{CLIF_CODE}: 'a photo of {{}}' around the tokens, no class word, "
                          "as in stage 1"),
            "vectors_per_token": V(2, f"{CLIF_CODE}: two new tokens per concept (kept as they are when the model "
                                   "comes from the CLIF trainer)", "both vectors start from the concept's class "
                                   "word; the code starts them from two different words"),
            "optimizer": V("adamw", f"{CLIF_APP}: Adam", "AdamW (weight decay 1e-2 on the LoRA and token rows), "
                           "the trainers' one optimizer"),
        },
        "paper-sid": {
            "steps": V(1000, "SID appendix C.2: 1000 iterations"),
            "batch_size": V(1, "SID appendix C.2: batch size 1"),
            "prior_preservation": V(True, "SID Sec. 3 and C.2: DreamBooth's class prior-preservation loss, as in "
                                    "DreamBooth"),
            "prior_weight": V(1.0, "DreamBooth's lambda = 1 (diffusers train_dreambooth's prior_loss_weight "
                              "default; SID used diffusers, C.2)"),
            "class_images": V(100, "diffusers train_dreambooth's num_class_images default (SID used diffusers, "
                              "C.2)"),
            "text_encoder_lora": V(True, "SID appendix C.2: 'We also trained a CLIP text encoder in conjunction "
                                   "with the U-Net'", "a LoRA on the text encoder instead of its full weights: "
                                   "less memory, and the export stays a LoRA stock ComfyUI loads"),
            "unet_lr": V(1e-4, "ours: 1e-4, the rate of diffusers' DreamBooth-LoRA example", "SID fine-tunes "
                         "the whole U-Net (DreamBooth; the rate is missing from our copy of C.2, DreamBooth uses "
                         "5e-6 for SD); a LoRA needs a larger rate"),
            "text_encoder_lr": V(1e-4, "ours: diffusers' train_dreambooth_lora.py trains the text-encoder LoRA at "
                                 "the U-Net LoRA's rate", "see unet_lr"),
            "token_lr": V(1e-4, "ours: the common rate", "DreamBooth's identifier is a rare existing word; ours is "
                          "a new token whose rows train"),
            "masked_loss": V(False, "SID Sec. 7.1 (Fig. 10): SID is the alternative to segmentation masks; DreamBooth "
                             "reconstructs the whole image"),
            "captions": V("auto", "SID Sec. 3.1: the concepts' own SID captions (the subject only as '[v] [class]', "
                          "every other object described)"),
            "template": V("a photo of {token} {class_word}", "SID Sec. 3.1 Case 1 / DreamBooth: 'a [v] [class name]' "
                          "for a photo without a caption"),
            "validation_steps": V(50, "SID appendix C.2: DDIM, 50 steps, guidance 7.5 (also the class images' "
                                  "steps)"),
        },
        "quick": {
            "steps": V(500, f"ours: {SPEED} -> under 10 minutes; 500 steps at batch 1 show each photo of a few "
                       "concepts dozens of times"),
            "unet_lr": V(2e-4, "ours: CLIF's rate (higher than the default 1e-4) so the short run converges"),
            "token_lr": V(2e-4, "ours: CLIF's rate"),
            "min_snr_gamma": V(5.0, "ours: Min-SNR weighting (Hang et al. 2023, gamma 5) converges faster at no "
                               "cost"),
            "prior_preservation": V(False, "ours: no class images to generate first (50+ sampled images would take "
                                    "a large share of the budget)"),
            "cache_latents": V(True, "ours: each photo is encoded once"),
            "gradient_checkpointing": V(False, "ours: an SD1.5 LoRA at batch 1 fits about 8 GB without it "
                                        "(kohya's figure); it costs ~30% time. Turn it on for SDXL on 12 GB"),
            "checkpoint_every": V(100, "ours: a Cancel or crash loses at most a minute or two"),
        },
    },
    "clif": {
        "paper": {
            "train": V("tokens+full", "CLIF 4.2 and appendix: the text encoder is fine-tuned like CLIP (the "
                       "reference code changes only the token rows: train = tokens)"),
            "steps": V(78125, f"{CLIF_CODE}: 200 epochs at batch 128 over the paper's ~40,000 G-Aug + ~10,000 "
                       "R-Aug pairs (200 x 50,000 / 128)", "the trainer counts steps, not epochs: for your dataset "
                       "200 epochs are 200 x pairs / 128 steps"),
            "batch_size": V(128, f"{CLIF_CODE}: batch 128 (the contrastive batch)"),
            "learning_rate": V(1e-4, f"{CLIF_APP}: learning rate 1e-4"),
            "token_lr": V(1e-4, f"{CLIF_CODE}: lr 1e-4 for the token rows"),
            "kinds": V("global,region", "CLIF 4.1: G-Aug and R-Aug fine-tune the text encoder; M-Aug is for the "
                       "decoder (stage 2)"),
            "vectors_per_token": V(2, f"{CLIF_CODE}: two new tokens per concept", "both vectors start from the "
                                   "concept's class word; the code starts them from two different words"),
            "optimizer": V("adamw", f"{CLIF_CODE}: 8-bit AdamW", "plain AdamW runs everywhere; the 8-bit one "
                           "(bitsandbytes, CUDA only) saves memory with the same update: choose adamw8bit to match"),
        },
        "quick": {
            "train": V("tokens", "ours: the public code's mode: only the token rows change (fastest, the rest of "
                       "the encoder cannot drift)"),
            "steps": V(3000, "ours: an encoder pass at batch 64 on cached image features takes ~0.1 s on a 12 GB "
                       "card (estimate) -> ~5 minutes; 3000 x 64 pairs = ~40 epochs of a 5,000-pair dataset"),
            "batch_size": V(64, "ours: half the paper's 128: steps twice as fast; still 63 negatives per pair in "
                            "the contrastive batch"),
            "token_lr": V(5e-4, "ours: token rows alone at 1e-4 move little in 3000 steps (the code runs ~78,000); "
                          "5e-4 is Break-a-Scene's token-row rate"),
            "kinds": V("global,region", "CLIF 4.1: the text encoder's pairs"),
        },
    },
    "em": {
        "paper": {
            "steps": V(800, f"{BAS}: 400 steps of token rows, then 400 of token rows + model weights"),
            "tokens_only_steps": V(400, f"{BAS}: phase 1 is 400 steps; Rahman et al. Sec. 3: 'usually 400'"),
            "token_lr": V(5e-4, f"{BAS}: phase 1 learning rate 5e-4"),
            "unet_lr": V(1e-4, "ours: a LoRA at the usual LoRA rate", "Break-a-Scene fine-tunes the full U-Net at "
                         "2e-6 in phase 2; a LoRA is the memory-friendly equivalent and needs a larger rate"),
            "attention_weight": V(1e-2, f"{BAS}: cross-attention loss weight 1e-2, in both phases"),
            "template": V("a photo of {token}", f"{BAS}: 'a photo of <asset0> and <asset2>'"),
            "init_timesteps": V(50, "Rahman et al. Fig. 2 and Sec. 4: attention averaged over 50 random timesteps"),
            "threshold_mode": V("fixed", "Rahman et al. Sec. 3 (mask extraction): 'a fixed threshold'"),
            "threshold": V(0.45, "ours: the paper gives no value; the middle of DiffuMask's 0.35-0.55 sweep"),
            "crf_at": V("image", "Rahman et al. Sec. 3 (mask extraction): DenseCRF on the image's pixels (colour "
                        "and distance); CutLER's parameters are in image pixels"),
            "crf_iterations": V(10, f"{CUTLER}: 10 iterations"),
            "crf_gaussian_sxy": V(3.0, f"{CUTLER}: Gaussian sxy 3"),
            "crf_gaussian_compat": V(7.0, f"{CUTLER}: Gaussian compat 7"),
            "crf_bilateral_sxy": V(50.0, f"{CUTLER}: bilateral sxy 50"),
            "crf_bilateral_srgb": V(5.0, f"{CUTLER}: bilateral srgb 5"),
            "crf_bilateral_compat": V(10.0, f"{CUTLER}: bilateral compat 10"),
            "fixed_mask_stage": V(True, "Rahman et al. Sec. 3: 'Finally, we optimize the tokens and parameters "
                                  "of the model jointly keeping the mask fixed, similar to [4]' (phase 2)"),
            "reestimate_every": V(10, "Rahman et al. Sec. 3: tokens and masks alternate 'at each iteration'",
                                  "every 10 steps, not every step: each round is kept on disk (masks, PNGs) and the "
                                  "tokens move little in 10 steps"),
        },
        "quick": {
            "steps": V(400, "ours: half of each Break-a-Scene phase; Rahman et al.'s 'usually 400' in all; about "
                       "1-1.5 s per step with attention capture on a 12 GB card -> ~10 minutes"),
            "tokens_only_steps": V(200, "ours: half of Break-a-Scene's 400-step phase 1"),
            "reestimate_every": V(50, "ours: 8 mask rounds of a few seconds each"),
            "reestimate_timesteps": V(10, "ours: later rounds average 10 timesteps (the tokens change little "
                                      "between rounds)"),
            "crf_at": V("latent", "ours: DenseCRF at latent size with kernels scaled down: milliseconds per round"),
        },
    },
}

# the settings class of each trainer kind (by name: the engine does not import the trainers)
KIND_OF = {"LoraSettings": "lora", "ClifSettings": "clif", "EMSettings": "em"}


def kind_of(settings_cls) -> str | None:
    return KIND_OF.get(getattr(settings_cls, "__name__", type(settings_cls).__name__))


def choices(kind: str) -> list[str]:
    """The preset names of a trainer kind, `custom` first (the node's default)."""
    return [CUSTOM, *PRESETS[kind]]


def defaults(settings_cls) -> dict[str, Any]:
    out = {}
    for f in fields(settings_cls):
        out[f.name] = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
    return out


def check_table(settings_cls, kind: str | None = None) -> None:
    """Every preset of the class's kind names only settings the class has, with a value of the setting's
    type and a source; a mistake here is the pack's, so it is a plain error at once."""
    kind = kind or kind_of(settings_cls)
    base = defaults(settings_cls)
    for name, table in PRESETS[kind].items():
        for key, v in table.items():
            if key not in base or key == "preset":
                raise ValueError(f"preset '{name}' of the {kind} trainer sets '{key}', which "
                                 f"{settings_cls.__name__} does not have")
            want = type(base[key])
            if not (isinstance(v.value, want) or (want is float and type(v.value) is int)) or \
                    (want is int and isinstance(v.value, bool)):
                raise ValueError(f"preset '{name}' of the {kind} trainer gives '{key}' the {type(v.value).__name__} "
                                 f"{v.value!r}; the setting is a {want.__name__}")
            if not v.source.strip():
                raise ValueError(f"preset '{name}' of the {kind} trainer gives '{key}' no source")


def preset_values(settings_cls, preset: str) -> dict[str, Any]:
    """The values a preset sets (custom: none). An unknown preset is refused with the choices."""
    kind = kind_of(settings_cls)
    if kind is None:
        raise ValueError(f"{settings_cls.__name__} has no presets")
    if preset == CUSTOM:
        return {}
    if preset not in PRESETS[kind]:
        raise UnconfusedError(f"'{preset}' is not a preset of the {kind} trainer; choose one of "
                              f"{', '.join(choices(kind))}", node=host.current_node_name() or kind, input="preset")
    check_table(settings_cls, kind)
    return {k: v.value for k, v in PRESETS[kind][preset].items()}


def with_preset(settings_cls, data: dict) -> dict:
    """A settings table (job file, --set, node widgets) with its `preset` expanded: the preset's values
    under the table's own. Applying it twice gives the same table. Classes without presets pass through."""
    if kind_of(settings_cls) is None or not isinstance(data, dict):
        return data
    preset = data.get("preset", CUSTOM)
    if not isinstance(preset, str):
        raise UnconfusedError(f"the preset must be a name ({', '.join(choices(kind_of(settings_cls)))}), not "
                              f"{preset!r}", node=host.current_node_name() or kind_of(settings_cls), input="preset")
    return {**preset_values(settings_cls, preset), **data, "preset": preset}
def apply_preset(settings_cls, preset: str, overrides: dict | None = None):
    """Settings from a preset plus the user's explicit values (which win); validated by the class's own
    `from_dict` (unknown settings are named there)."""
    data = {**(overrides or {}), "preset": preset}
    data = with_preset(settings_cls, data)
    return settings_cls.from_dict(data)


def from_widgets(settings_cls, preset: str, widgets: dict) -> Any:
    """Settings from a node: the node sends every widget's value, so a widget still at its default is
    not an explicit choice - the preset sets it; a widget the user changed wins over the preset."""
    base = defaults(settings_cls)
    overrides = {k: v for k, v in widgets.items() if k not in base or v != base[k]}
    return apply_preset(settings_cls, preset or CUSTOM, overrides)


def effective(settings) -> dict[str, dict[str, Any]]:
    """Every setting of a settings instance: its value and where it came from (default / preset / user).
    A value that equals the preset's counts as the preset's."""
    table = PRESETS.get(kind_of(type(settings)) or "", {}).get(getattr(settings, "preset", CUSTOM), {})
    base = defaults(type(settings))
    out = {}
    for name in base:
        if name == "preset":
            continue
        value = getattr(settings, name)
        if name in table:
            origin = "preset" if value == table[name].value else "user"
        else:
            origin = "default" if value == base[name] else "user"
        out[name] = {"value": value, "from": origin}
    return out


def record(settings) -> dict:
    """What the run folder keeps (settings.json): the preset and every effective setting with its origin."""
    eff = effective(settings)
    return {"preset": getattr(settings, "preset", CUSTOM), "trainer": kind_of(type(settings)),
            "settings": {k: v["value"] for k, v in eff.items()},
            "from": {k: v["from"] for k, v in eff.items()}}


def write_record(run_dir: str | Path, settings) -> Path:
    from .files import atomic_write_json

    return atomic_write_json(Path(run_dir) / "settings.json", json.loads(json.dumps(record(settings), default=str)))


def export_metadata(settings) -> dict[str, Any]:
    """Safetensors header entries of an export: the preset, every effective setting, and which of them the
    user set (engine.models.exports.clean_metadata turns the values into JSON text)."""
    rec = record(settings)
    return {"unconfused_preset": rec["preset"], "unconfused_settings": rec["settings"],
            "unconfused_user_settings": sorted(k for k, v in rec["from"].items() if v == "user")}


# ---------------------------------------------------------------- docs/presets.md
def _fmt(value) -> str:
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, float) and value and (abs(value) < 1e-2 or abs(value) >= 1e5):
        return f"`{value:.0e}`".replace("e-0", "e-")
    return f"`{value}`"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def doc_page(settings_classes: dict[str, type]) -> str:
    """docs/presets.md: per trainer kind, a table per paper preset (with the quick values beside `paper`)."""
    lines = ["# Presets", "",
             "<!-- generated by `python scripts/gen_docs.py presets` from engine/presets.py; do not edit -->", "",
             "Every trainer node and job file has `preset`:", "",
             "- `custom` (the default): no values; every setting is what you set, else its default.",
             "- `paper`: the paper's own recipe for what the trainer runs; the LoRA trainer also has `paper-sid` "
             "(the SID paper's DreamBooth), since it runs both CLIF stage 2 and SID.",
             "- `quick`: a budget that finishes well under an hour on a 12 GB GPU (SD1.5 at 512 px) and still "
             "learns the concepts. Its times are estimates from the per-step speeds named in the table, not "
             "measured on a 12 GB card.", "",
             "How a preset meets your values: the preset's values first, then every setting you gave explicitly "
             "wins. In a job file that is every key of `[settings]` (write `preset = \"paper\"` at the top or in "
             "`[settings]`; `--set preset=quick` works too). On a node every widget has a value, so a widget still "
             "at its default counts as not set: the preset sets it; a widget you changed wins. To force a preset "
             "setting back to its default, use `custom`.", "",
             "`resolution` is in no preset: it is the model's (512 for SD1, 768 for SD2-v, 1024 for SDXL).", "",
             "What is recorded: the run folder's `settings.json` holds the preset and every effective setting with "
             "where it came from (`default`, `preset` or `user`); exported files carry `unconfused_preset`, "
             "`unconfused_settings` and `unconfused_user_settings` in their safetensors header.", "",
             "A value's source is a paper section, table or reference code (notes/methods.md), or \"ours\" with "
             "the reason where the paper gives none. The deviation column says where a `paper` value departs on "
             "purpose from the paper, and why.", ""]
    for kind, cls in settings_classes.items():
        base = defaults(cls)
        tables = PRESETS[kind]
        lines += [f"## `{kind}` trainer (`{cls.__name__}`)", ""]
        for name in [n for n in tables if n.startswith("paper")]:
            lines += [f"### `{name}`", "", ABOUT[(kind, name)], ""]
            if name == "paper" and "quick" in tables:
                lines += [f"`quick`: {ABOUT[(kind, 'quick')]}", ""]
                keys = list(dict.fromkeys([*tables[name], *tables["quick"]]))
                lines += ["| setting | paper | quick | default | source of the paper value | deviation | "
                          "why the quick value |", "| --- | --- | --- | --- | --- | --- | --- |"]
                for k in keys:
                    p, q = tables[name].get(k), tables["quick"].get(k)
                    lines.append("| " + " | ".join([f"`{k}`", _fmt(p.value) if p else "-", _fmt(q.value) if q else "-",
                                                    _fmt(base[k]), _cell(p.source) if p else "-",
                                                    _cell(p.deviation) if p else "", _cell(q.source) if q else "-"])
                                 + " |")
            else:
                lines += [f"| setting | {name} | default | source | deviation |", "| --- | --- | --- | --- | --- |"]
                for k, v in tables[name].items():
                    lines.append(f"| `{k}` | {_fmt(v.value)} | {_fmt(base[k])} | {_cell(v.source)} | "
                                 f"{_cell(v.deviation)} |")
            lines.append("")
    return "\n".join(lines)
