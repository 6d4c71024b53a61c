"""CLIF augmentation nodes: the builder (G-Aug, R-Aug, M-Aug into a dataset folder), a loader for
a dataset folder, and a preview of a dataset's pairs."""

from __future__ import annotations

from pathlib import Path

from ..engine.data.augment.bank import BankSpec, bank_from_folder, generate_bank
from ..engine.data.augment.build import AugmentSettings, DEFAULT_TEMPLATES, build_dataset
from ..engine.data.augment.cutout import MATTES, NODE
from ..engine.data.augment.kinds import KINDS
from ..engine.data.augment.preview import regions_preview
from ..engine.data.augment import preview as augment_preview
from ..engine import host
from ..engine.data.augment.word_lists import default_common_text, parse_list, REGION_VOCABULARY
from ..engine.data.concepts import pil_to_tensor
from ..engine.data.augmented_dataset import Dataset
from ..engine.errors import UnconfusedError
from ..engine.files import safe_name
from ..engine.vision.regions import region_tools
from .common import CATEGORY, CLIP_MODEL, CONCEPT_SET, DATASET, MODEL_BUNDLE, SAM_MODEL, float_input, int_input, \
    with_preview

DATASETS_SUBFOLDER = "unconfused/datasets"
KIND_CHOICES = ["all", *KINDS]
_S = AugmentSettings()
_B = BankSpec()



def dataset_folder(name: str, *, input: str = "name") -> Path:
    """A dataset's folder: a bare name is under output/unconfused/datasets; an absolute path is used as is."""
    if not (name or "").strip():
        raise UnconfusedError("give the dataset a name", input=input)
    path = Path(name.strip()).expanduser()
    if path.is_absolute():
        return path
    return host.output_dir() / DATASETS_SUBFOLDER / safe_name(name, input=input)


class UnconfusedAugmentBuilder:
    """CLIF's augmented dataset: many image-text pairs made from each concept's cut-outs."""

    NODE_ID = NODE

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "concept_set": (CONCEPT_SET, {"tooltip": "Concepts with masks (from the Concept Cut-out SAM+CLIP "
                                                         "node, or your own): the masks give the cut-outs"}),
                "name": ("STRING", {"default": "clif", "tooltip": "Dataset folder under output/unconfused/datasets. "
                                    "Same name + same settings = resume"}),
                "seed": int_input(0, 0, 2**31 - 1, "Every pair is made from (seed, kind, index)"),
                "global_pairs": int_input(_S.global_pairs, 0, 1_000_000, "G-Aug pairs: a concept with common concepts "
                                     "(paper: about 40,000)"),
                "region_pairs": int_input(_S.region_pairs, 0, 1_000_000, "R-Aug pairs: a concept's labelled parts "
                                     "(paper: about 10,000); needs sam_model and clip_model"),
                "mix_per_pair": int_input(_S.mix_per_pair, 0, 10_000, "M-Aug pairs per pair of concepts (two concepts "
                                     "side by side; paper: 612 for 18 concepts = 4 per pair)"),
                "canvas": int_input(_S.canvas, 64, 2048, "Pair image size (square)", step=8),
                "resume": (["auto", "restart"], {"default": "auto", "tooltip": "auto: finish or reuse the dataset "
                                                  "of this name; restart: make it again"}),
            },
            "optional": {
                "model": (MODEL_BUNDLE, {"tooltip": "The base model: generates the common-concept bank (cached; "
                                                    "a rerun makes only what is missing)"}),
                "bank_folder": ("STRING", {"default": "", "tooltip": "Instead of generating: a folder of common-"
                                           "concept images (one subfolder per concept, or files named after it); "
                                           "relative paths are under ComfyUI's input folder"}),
                "common_concepts": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": default_common_text(),
                                               "tooltip": "Common concepts for the bank, one per line, with their "
                                                          "article ('a policeman')"}),
                "images_per_common": int_input(_B.per_concept, 1, 100, "Bank images per common concept (paper: 20)"),
                "bank_steps": int_input(_B.steps, 1, 150, "Sampling steps of the bank images"),
                "bank_cfg": float_input(_B.cfg, 0.0, 30.0, 0.5, "Guidance scale of the bank images"),
                "bank_size": int_input(_B.size, 64, 2048, "Bank image size (512 for SD1, 768 for SD2-v)", step=8),
                "bank_matte": (MATTES, {"default": MATTES[0], "tooltip": "How bank images are cut out: their "
                               "plain background is removed, or the whole image is used"}),
                "sam_model": (SAM_MODEL, {"tooltip": "For R-Aug (SAM Loader): over-segments each cut-out "
                                  "(automatic mode)"}),
                "clip_model": (CLIP_MODEL, {"tooltip": "For R-Aug (CLIP Scorer Loader): labels each region "
                                    "with a vocabulary word"}),
                "vocabulary": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "", "tooltip": "Your words for the "
                                          "concepts' parts (e.g. from the SID captioner), comma or line separated"}),
                "use_default_vocabulary": ("BOOLEAN", {"default": True, "tooltip": "Also the built-in parts list "
                                           "(hair, hat, necklace, ...)"}),
                "min_common": int_input(_S.min_common, 0, 8, "G-Aug: fewest common concepts next to the concept"),
                "max_common": int_input(_S.max_common, 0, 8, "G-Aug: most common concepts next to the concept"),
                "region_common": int_input(_S.region_common, 0, 8, "R-Aug: most common concepts in a pair"),
                "regions_per_pair": int_input(_S.regions_per_pair, 1, 8, "R-Aug: most parts of the concept in a pair"),
                "min_scale": float_input(_S.min_scale, 0.05, 1.0, 0.05, "Smallest element height (fraction of canvas)"),
                "max_scale": float_input(_S.max_scale, 0.05, 1.0, 0.05, "Largest element height (fraction of canvas)"),
                "min_area": float_input(_S.min_area, 0.0, 1.0, 0.01, "A usable cut-out covers at least this fraction "
                                   "of its photo (the paper: 10%)"),
                "min_regions": int_input(_S.min_regions, 1, 50, "R-Aug: wanted parts per concept (a note if fewer)"),
                "max_regions": int_input(_S.max_regions, 1, 50, "R-Aug: most parts kept per concept"),
                "with_class_word": ("BOOLEAN", {"default": _S.with_class_word, "tooltip": "Captions say "
                                    "'<alice> woman' instead of '<alice>'"}),
                "flip": ("BOOLEAN", {"default": _S.flip, "tooltip": "Random horizontal flips of the elements"}),
                "templates": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "\n".join(DEFAULT_TEMPLATES),
                                         "tooltip": "Caption templates, one per line; {} is where the names go"}),
                "preview_count": int_input(8, 0, 64, "Pairs shown in the preview"),
                "device": (host.DEVICE_CHOICES, {"default": "auto", "tooltip": "Where the bank is generated"}),
            },
        }

    RETURN_TYPES = (DATASET, "STRING", "IMAGE")
    RETURN_NAMES = ("dataset", "info", "preview")
    FUNCTION = "build"
    CATEGORY = f"{CATEGORY}/augment"
    OUTPUT_NODE = True

    def build(self, concept_set, name, seed, global_pairs, region_pairs, mix_per_pair, canvas, resume="auto",
              model=None, bank_folder="", common_concepts=None, images_per_common=_B.per_concept,
              bank_steps=_B.steps, bank_cfg=_B.cfg, bank_size=_B.size, bank_matte=MATTES[0], sam_model=None,
              clip_model=None, vocabulary="", use_default_vocabulary=True, templates=None, preview_count=8,
              device="auto", **kw):
        words = (list(REGION_VOCABULARY) if use_default_vocabulary else []) + parse_list(vocabulary)
        words = list(dict.fromkeys(words))
        temps = [t.strip() for t in (templates.splitlines() if templates is not None else DEFAULT_TEMPLATES)
                 if t.strip()]
        settings = AugmentSettings(seed=seed, canvas=canvas, global_pairs=global_pairs, region_pairs=region_pairs,
                                     mix_per_pair=mix_per_pair, templates=temps, vocabulary=words, **kw)
        settings.check(len(concept_set.concepts))
        bank = None
        if settings.needs_bank(len(concept_set.concepts)):
            if (bank_folder or "").strip():
                path = Path(bank_folder.strip()).expanduser()
                bank = bank_from_folder(path if path.is_absolute() else host.input_dir() / path, matte=bank_matte,
                                          max_side=canvas)
            elif model is not None:
                phrases = parse_list(common_concepts if common_concepts is not None else default_common_text())
                spec = BankSpec(phrases=phrases, per_concept=images_per_common, seed=seed, steps=bank_steps,
                                  cfg=bank_cfg, size=bank_size)
                bank = generate_bank(model, spec, matte=bank_matte, max_side=canvas, device=host.device(device))
            else:
                raise UnconfusedError("G-Aug needs common concepts: connect the model (the bank is generated with "
                                      "it) or give bank_folder; or set global_pairs to 0", input="model")
        proposer = labeller = None
        if settings.needs_regions(len(concept_set.concepts)):
            if sam_model is None or clip_model is None:
                missing = "sam_model" if sam_model is None else "clip_model"
                raise UnconfusedError(f"R-Aug needs {missing}: connect SAM Loader and CLIP Scorer Loader "
                                      "(Unconfused/masks), or set region_pairs to 0", input=missing)
            proposer, labeller = region_tools(sam_model, clip_model)
        folder = dataset_folder(name)
        result = build_dataset(concept_set, folder, settings, bank=bank, proposer=proposer, labeller=labeller,
                                 resume=(resume == "auto"))
        ds = Dataset(folder)
        info = result.info() + ("\nbank: " + bank.describe() if bank is not None else "")
        images = []
        if preview_count > 0:
            images = [augment_preview.preview(ds, count=preview_count, seed=seed)]
            regions = regions_preview(folder)
            if regions is not None:  # the labelled parts R-Aug used, second on the node
                images.append(regions)
        preview = pil_to_tensor(images[0])[None] if images else _blank()
        out = with_preview((ds, info, preview), images, "unconfused_augment")
        out["ui"]["text"] = [info]
        return out


def _blank():
    import torch

    return torch.zeros(1, 64, 64, 3)


class UnconfusedLoadDataset:
    """An augmented dataset folder made earlier (by the builder, or copied from another machine)."""

    NODE_ID = "UnconfusedLoadDataset"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "name": ("STRING", {"default": "clif", "tooltip": "A dataset under output/unconfused/datasets, or an "
                                "absolute folder path"}),
            "allow_incomplete": ("BOOLEAN", {"default": False, "tooltip": "Use a dataset whose build was cut off "
                                             "(its pairs are all usable, but fewer than asked for)"}),
        }}

    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "info")
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/augment"

    @classmethod
    def IS_CHANGED(cls, name, allow_incomplete=False):
        try:
            folder = dataset_folder(name)
            return f"{(folder / 'manifest.json').stat().st_mtime_ns}:{(folder / 'records.jsonl').stat().st_size}"
        except (OSError, UnconfusedError):
            return float("nan")

    def load(self, name, allow_incomplete=False):
        folder = dataset_folder(name)
        if not (folder / "manifest.json").is_file():
            raise UnconfusedError(f"there is no dataset {folder}; build one with the CLIF Augmentation Builder "
                                  "(or give the folder's full path)", input="name")
        ds = Dataset(folder, input="name")
        if not ds.complete and not allow_incomplete:
            raise UnconfusedError(f"{ds.describe()}: run the builder again with the same settings to finish it, or "
                                  "turn on allow_incomplete", input="name")
        return (ds, ds.describe())


class UnconfusedDatasetPreview:
    """A sample grid of a dataset's pairs with their captions (and masks tinted)."""

    NODE_ID = "UnconfusedDatasetPreview"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": (DATASET,),
            "count": int_input(12, 1, 64, "Pairs to show"),
            "kind": (KIND_CHOICES, {"default": "all", "tooltip": "global = G-Aug, region = R-Aug, mix = M-Aug"}),
            "seed": int_input(0, 0, 2**31 - 1, "Which pairs are picked"),
            "show_masks": ("BOOLEAN", {"default": True, "tooltip": "Tint each element's mask"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    FUNCTION = "show"
    CATEGORY = f"{CATEGORY}/augment"
    OUTPUT_NODE = True

    def show(self, dataset, count=12, kind="all", seed=0, show_masks=True):
        kinds = () if kind == "all" else (kind,)
        try:
            sheet = augment_preview.preview(dataset, count=count, kinds=kinds, seed=seed, masks=show_masks)
        except UnconfusedError as e:
            raise UnconfusedError(str(e).split(": ", 1)[-1], input="kind") from e
        out = with_preview((pil_to_tensor(sheet)[None],), [sheet], "unconfused_dataset")
        out["ui"]["text"] = [dataset.describe()]
        return out


NODE_CLASS_MAPPINGS = {
    UnconfusedAugmentBuilder.NODE_ID: UnconfusedAugmentBuilder,
    UnconfusedLoadDataset.NODE_ID: UnconfusedLoadDataset,
    UnconfusedDatasetPreview.NODE_ID: UnconfusedDatasetPreview,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    UnconfusedAugmentBuilder.NODE_ID: "CLIF Augmentation Builder (Unconfused)",
    UnconfusedLoadDataset.NODE_ID: "Load Augmented Dataset (Unconfused)",
    UnconfusedDatasetPreview.NODE_ID: "Preview Augmented Dataset (Unconfused)",
}
