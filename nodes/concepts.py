"""Concept nodes: define a concept, gather concepts into a set, save and load sets."""

from __future__ import annotations

from pathlib import Path

from ..engine.data import concepts as C
from ..engine import host
from ..engine.errors import UnconfusedError
from ..engine.files import inside, safe_name
from ..engine.preview import grid, overlay_masks
from .common import CATEGORY, CONCEPT, CONCEPT_SET, with_preview

MAX_CONCEPTS = 8
SETS_SUBFOLDER = "unconfused/concept_sets"


def concept_preview(concepts: list[C.Concept]):
    """One cell per reference image: the photo with its mask tinted, labelled with token and class."""
    cells, labels = [], []
    for ci, c in enumerate(concepts):
        for i, img in enumerate(c.images):
            if c.masks is not None:
                cells.append(overlay_masks(img, [c.masks[i]]))
            else:
                cells.append(C.tensor_to_pil(img))
            caption = c.captions[i] if c.captions else ""
            labels.append(f"{c.token} ({c.class_word}) #{i}" + (f": {caption}" if caption else ""))
    return grid(cells, labels, cell=192, columns=6, caption_lines=3)


def split_captions(text: str) -> list[str] | None:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines or None


class UnconfusedConcept:
    NODE_ID = "UnconfusedConcept"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "token": ("STRING", {"default": "<alice>", "tooltip": "A new word for this concept, e.g. <alice>"}),
                "class_word": ("STRING", {"default": "woman", "tooltip": "What it is: woman, dog, teapot"}),
                "images": ("IMAGE", {"tooltip": "Reference photos of the concept"}),
            },
            "optional": {
                "masks": ("MASK", {"tooltip": "One mask per photo (white = the concept); optional"}),
                "captions": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "",
                                        "tooltip": "Optional: one caption per photo, one per line"}),
            },
        }

    RETURN_TYPES = (CONCEPT,)
    RETURN_NAMES = ("concept",)
    FUNCTION = "make"
    CATEGORY = f"{CATEGORY}/concepts"

    def make(self, token, class_word, images, masks=None, captions=""):
        concept = C.make_concept(token, class_word, images, masks)
        caps = split_captions(captions)
        if caps is not None:
            if len(caps) != len(concept.images):
                raise UnconfusedError(f"{len(caps)} caption lines for {len(concept.images)} images; write one "
                                      "caption per line, one per photo", input="captions")
            concept = concept.with_captions(caps)
        return with_preview((concept,), [concept_preview([concept])], "concept")


class UnconfusedConceptFromFolder:
    """A concept from a folder of photos (any sizes), with kohya-style `.txt` captions if present."""

    NODE_ID = "UnconfusedConceptFromFolder"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "", "tooltip": "A folder of photos; relative paths are under "
                                                           "ComfyUI's input folder"}),
            "token": ("STRING", {"default": "<alice>"}),
            "class_word": ("STRING", {"default": "woman"}),
        }}

    RETURN_TYPES = (CONCEPT,)
    RETURN_NAMES = ("concept",)
    FUNCTION = "make"
    CATEGORY = f"{CATEGORY}/concepts"

    def make(self, folder, token, class_word):
        path = Path(folder).expanduser()
        if not folder.strip():
            raise UnconfusedError("give the folder that holds the photos", input="folder")
        if not path.is_absolute():
            path = host.input_dir() / folder
        concept = C.concept_from_folder(path, token, class_word)
        return with_preview((concept,), [concept_preview([concept])], "concept")


class UnconfusedConceptSet:
    NODE_ID = "UnconfusedConceptSet"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"concept_1": (CONCEPT,)},
            "optional": {f"concept_{i}": (CONCEPT,) for i in range(2, MAX_CONCEPTS + 1)},
        }

    RETURN_TYPES = (CONCEPT_SET,)
    RETURN_NAMES = ("concept_set",)
    FUNCTION = "gather"
    CATEGORY = f"{CATEGORY}/concepts"

    def gather(self, **concepts):
        ordered = [concepts.get(f"concept_{i}") for i in range(1, MAX_CONCEPTS + 1)]
        cs = C.make_concept_set([c for c in ordered if c is not None])
        return with_preview((cs,), [concept_preview(cs.concepts)], "concept_set")


class UnconfusedSaveConceptSet:
    NODE_ID = "UnconfusedSaveConceptSet"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "concept_set": (CONCEPT_SET,),
            "name": ("STRING", {"default": "my_concepts", "tooltip": f"Saved to output/{SETS_SUBFOLDER}/<name>"}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("folder",)
    FUNCTION = "save"
    CATEGORY = f"{CATEGORY}/concepts"
    OUTPUT_NODE = True

    def save(self, concept_set, name):
        base = host.output_dir() / SETS_SUBFOLDER
        folder = inside(base, safe_name(name, input="name"), input="name")
        C.save_concept_set(concept_set, folder)
        return {"ui": {"text": [str(folder)]}, "result": (str(folder),)}


class UnconfusedLoadConceptSet:
    NODE_ID = "UnconfusedLoadConceptSet"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "my_concepts", "tooltip": "A name under output/"
                                  f"{SETS_SUBFOLDER}, or a full path to a concept set folder"}),
        }}

    RETURN_TYPES = (CONCEPT_SET,)
    RETURN_NAMES = ("concept_set",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/concepts"

    @classmethod
    def IS_CHANGED(cls, folder):
        path = cls._resolve(folder)
        manifest = path / "concept_set.json"
        return manifest.stat().st_mtime if manifest.exists() else float("nan")

    @staticmethod
    def _resolve(folder: str) -> Path:
        path = Path(folder).expanduser()
        return path if path.is_absolute() else host.output_dir() / SETS_SUBFOLDER / folder

    def load(self, folder):
        cs = C.load_concept_set(self._resolve(folder))
        return with_preview((cs,), [concept_preview(cs.concepts)], "concept_set")


_NODES = [UnconfusedConcept, UnconfusedConceptFromFolder, UnconfusedConceptSet, UnconfusedSaveConceptSet,
          UnconfusedLoadConceptSet]
NODE_CLASS_MAPPINGS = {n.NODE_ID: n for n in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {
    "UnconfusedConcept": "Concept (Unconfused)",
    "UnconfusedConceptFromFolder": "Concept from Folder (Unconfused)",
    "UnconfusedConceptSet": "Concept Set (Unconfused)",
    "UnconfusedSaveConceptSet": "Save Concept Set (Unconfused)",
    "UnconfusedLoadConceptSet": "Load Concept Set (Unconfused)",
}
