"""Default word lists for CLIF's augmentations (paper appendix A.1.1), editable on the node.

- `COMMON_CONCEPTS`: about 100 general concepts - people, animals, objects, clothing - that the
  base model draws on a solid background and that G-Aug / R-Aug put next to the user's concepts
  ("a photo of <alice> and a policeman"). Each entry is the phrase used in captions, with its
  article; the label of its mask is the phrase without the article.
- `REGION_VOCABULARY`: parts and attributes a concept's sub-regions are labelled with by the
  CLIP labeller for R-Aug ("<alice>'s hair"); the user's own words (e.g. from the SID
  captioner) are added to it.
"""

from __future__ import annotations

import re

COMMON_CONCEPTS: list[str] = [
    # people
    "a policeman", "a firefighter", "a chef", "a doctor", "a nurse", "an astronaut", "a soldier",
    "a farmer", "a businessman", "a businesswoman", "an old man", "an old woman", "a little boy",
    "a little girl", "a teenager", "a baby", "a pirate", "a knight", "a wizard", "a clown",
    "a ballerina", "a cowboy", "a construction worker", "a scientist", "a monk", "a samurai",
    "a football player", "a painter", "a musician", "a mail carrier",
    # animals
    "a dog", "a cat", "a horse", "a cow", "a sheep", "a pig", "a chicken", "a duck", "a rabbit",
    "a fox", "a bear", "a panda", "a lion", "a tiger", "an elephant", "a giraffe", "a zebra",
    "a monkey", "a parrot", "an owl", "a penguin", "a turtle", "a frog", "a goldfish", "a squirrel",
    # objects
    "a chair", "a wooden table", "a lamp", "a teapot", "a coffee mug", "a vase of flowers",
    "a potted plant", "a bicycle", "a motorcycle", "a car", "a guitar", "a violin", "a teddy bear",
    "a soccer ball", "an umbrella", "a suitcase", "a backpack", "a laptop", "a camera", "a clock",
    "a book", "a bottle", "a basket of fruit", "an apple", "a pumpkin", "a cake", "a robot",
    # clothing
    "a denim jacket", "a leather jacket", "a red dress", "a sweater", "a hoodie", "a t-shirt",
    "a pair of jeans", "a pair of sneakers", "a pair of boots", "a scarf", "a straw hat",
    "a baseball cap", "a top hat", "a pair of sunglasses", "a necktie", "a handbag",
    "a winter coat", "a raincoat",
]

REGION_VOCABULARY: list[str] = [
    # people and characters
    "hair", "face", "eyes", "ear", "nose", "mouth", "beard", "mustache", "neck", "hand", "arm", "leg",
    "foot", "hat", "cap", "helmet", "crown", "glasses", "sunglasses", "earring", "necklace", "scarf",
    "tie", "bow tie", "collar", "shirt", "t-shirt", "jacket", "coat", "sweater", "vest", "dress",
    "skirt", "pants", "jeans", "shorts", "belt", "gloves", "shoes", "boots", "socks", "bag",
    # animals
    "fur", "head", "snout", "paw", "tail", "whiskers", "wing", "feathers", "beak", "horn", "mane",
    # objects and toys
    "body", "handle", "strap", "pocket", "zipper", "button", "logo", "lid", "wheel", "screen",
    "label", "ribbon", "bow",
]

# Plain, light background colours named in the bank prompts (they make the cut-out easy).
BACKGROUND_COLORS = ["white", "light gray", "light blue", "beige", "pale green", "pale pink"]

BANK_PROMPT = "a photo of {phrase}, full view, centered, isolated on a solid {color} background"

_ARTICLE = re.compile(r"^(a pair of|an|a|the|some)\s+", re.IGNORECASE)


def parse_list(text: str) -> list[str]:
    """Entries of a user list: one per line or comma-separated; '#' starts a comment; order kept,
    duplicates dropped."""
    out: list[str] = []
    for line in (text or "").splitlines():
        line = line.split("#", 1)[0]
        for part in line.split(","):
            part = " ".join(part.split())
            if part and part not in out:
                out.append(part)
    return out


def label_of(phrase: str) -> str:
    """The mask label of a phrase: 'a pair of jeans' -> 'jeans', 'an old man' -> 'old man'."""
    return _ARTICLE.sub("", phrase.strip()).strip() or phrase.strip()


def phrase_of(label: str) -> str:
    """A caption phrase for a bare label ('policeman' -> 'a policeman'); phrases are kept."""
    label = " ".join(label.split())
    if _ARTICLE.match(label + " ") and label_of(label) != label:
        return label
    if label.endswith("s") and not label.endswith("ss"):  # jeans, boots: plural nouns
        return label
    return ("an " if label[:1].lower() in "aeiou" else "a ") + label


def default_common_text() -> str:
    return "\n".join(COMMON_CONCEPTS)


def default_vocabulary_text() -> str:
    return ", ".join(REGION_VOCABULARY)
