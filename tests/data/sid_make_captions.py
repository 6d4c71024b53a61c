"""Writes tests/data/sid_captions.tsv: captions built from the SID paper's Case 1-4 definitions
(Tab. 1), each with the verdict the checker should give. Run it again after editing the pieces:

    python tests/data/sid_make_captions.py

Case 1: only "<v> class". Case 2: the other things are named, with no specific detail. Case 3 (SID):
the other things described in detail, nothing about the subject's looks. Case 4: Case 3 plus a
description of the subject's own looks, in every place a VLM puts one. Hard negatives are Case 3
captions that mention someone else's looks or the subject's body as a place ("around its neck").
Columns: case, token, class, expected (ok | repaired | flagged), form, caption.
"""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = [  # token, class, kind, pronoun, looks (noun phrases a VLM writes about such a subject), adjectives
    ("<sks>", "dog", "animal", "its", ["golden fur", "long floppy ears", "a black nose", "brown eyes", "a curly coat",
                                      "a bushy tail", "white paws"], ["fluffy", "golden", "brown", "small"]),
    ("<cat1>", "cat", "animal", "its", ["grey striped fur", "green eyes", "long white whiskers", "a fluffy tail",
                                       "orange markings"], ["grey", "fluffy", "striped", "black"]),
    ("<alice>", "woman", "person", "her", ["long blonde hair", "freckles", "blue eyes", "a pale complexion",
                                         "curly red hair"], ["young", "blonde", "tall", "smiling"]),
    ("<bob>", "man", "person", "his", ["a short grey beard", "curly black hair", "brown eyes", "a tanned face"],
     ["bald", "tall", "old", "muscular"]),
    ("<tb>", "teddy bear", "toy", "its", ["brown fur", "black button eyes", "round ears", "a stitched nose"],
     ["brown", "fluffy", "old", "small"]),
    ("<vz>", "vase", "object", "its", ["a glossy blue glaze", "a crackled surface", "a floral pattern",
                                      "a matte white finish"], ["ceramic", "blue", "tall", "glossy"]),
    ("<bp>", "backpack", "object", "its", ["a faded red colour", "a checkered pattern", "a rough canvas texture"],
     ["red", "leather", "small", "black"]),
    ("<ch>", "chair", "object", "its", ["a dark walnut finish", "a woven texture", "a bright green colour"],
     ["wooden", "green", "old", "metal"]),
]
ACTIONS = {"animal": ["sitting", "lying", "standing", "sleeping", "resting"],
           "person": ["sitting", "standing", "reading", "leaning", "resting"],
           "toy": ["sitting", "lying", "propped up", "placed", "resting"],
           "object": ["standing", "placed", "resting", "sitting", "set"]}
THIRD = {"sitting": "sits", "lying": "lies", "standing": "stands", "sleeping": "sleeps", "resting": "rests",
         "reading": "reads", "leaning": "leans", "propped up": "is propped up", "placed": "is placed",
         "set": "is set"}
SCENES = [  # (Case 3: described in detail, Case 2: the same things only named)
    ("on a red plaid blanket in front of a brick fireplace", "on a blanket in front of a fireplace"),
    ("next to a black leather purse with silver hardware on white sheets", "next to a purse on sheets"),
    ("on a wet sandy beach beside a blue plastic bucket", "on a beach beside a bucket"),
    ("on a grey linen sofa with two striped cushions", "on a sofa with cushions"),
    ("under a tall oak tree in a sunny park with yellow tulips", "under a tree in a park with flowers"),
    ("on a wooden porch next to a rusty metal watering can", "on a porch next to a watering can"),
    ("in a cluttered kitchen with white tiled walls and a copper kettle", "in a kitchen with a kettle"),
    ("beside a window with lace curtains and a potted fern", "beside a window with curtains and a fern"),
    ("on a snowy mountain trail with pine trees under a cloudy sky", "on a mountain trail with trees"),
    ("on a marble countertop next to a glass bottle of olive oil", "on a countertop next to a bottle of oil"),
    ("in front of a red brick wall covered with green ivy", "in front of a wall covered with ivy"),
    ("on a narrow cobblestone street lined with old stone houses", "on a street lined with houses"),
    ("next to a yellow tennis ball on short green grass", "next to a ball on the grass"),
    ("on a blue yoga mat in a bright room with large windows", "on a mat in a room with windows"),
    ("at a round wooden table with a white ceramic mug of coffee", "at a table with a mug of coffee"),
    ("in a wicker basket lined with a soft pink blanket", "in a basket with a blanket"),
    ("on a dusty dirt road at sunset beside orange traffic cones", "on a road beside traffic cones"),
    ("on a shelf between two stacks of old hardcover books", "on a shelf between books"),
    ("in a busy cafe with hanging plants and a chalkboard menu", "in a cafe with plants and a menu"),
    ("on the deck of a white sailboat on a calm turquoise lake", "on the deck of a boat on a lake"),
]
OTHERS = {  # someone else's looks (hard negatives): another being with a look noun
    "animal": ["beside a woman with long brown hair", "while a man with a grey beard watches",
               "next to another dog with white fur"],
    "person": ["beside a dog with golden fur", "next to a man with curly hair", "holding a kitten with green eyes"],
    "toy": ["beside a girl with red pigtails", "next to a cat with grey fur"],
    "object": ["beside a cat with orange fur", "next to a woman with short hair"],
}
STYLE = ("<vg>", "art")
STYLE_CONTENT = [
    ("a fishing boat on a calm lake with two men in straw hats", "a boat on a lake with men"),
    ("a red farmhouse among golden wheat fields under a stormy sky", "a farmhouse among fields"),
    ("three women in white dresses walking along a sandy shore", "women walking along a shore"),
    ("a crowded market square with striped awnings and fruit stalls", "a market square with stalls"),
    ("a narrow canal with old brick houses and a small wooden bridge", "a canal with houses and a bridge"),
    ("sunflowers in a blue clay vase on a wooden table", "flowers in a vase on a table"),
]
STYLE_LEAKS = ["with bold brushstrokes", "in thick impasto", "with a vibrant colour palette", "in soft watercolour"]


def rows() -> list[tuple]:
    rnd = random.Random(0)
    out = []

    def add(case, tok, cls, expected, form, caption):
        out.append((case, tok, cls, expected, form, caption))

    for tok, cls, kind, pron, looks, adjs in SUBJECTS:
        subj = f"{tok} {cls}"
        for k, (s3, s2) in enumerate(SCENES):
            act = ACTIONS[kind][k % len(ACTIONS[kind])]
            det = rnd.choice(["A", "A", "The", "a"])
            end = rnd.choice([".", ".", ""])
            look = looks[k % len(looks)]
            bare = look.split(" ", 1)[1] if look.startswith(("a ", "an ")) else look  # after its/whose
            lnoun = look.split()[-1]
            add(3, tok, cls, "ok", "sid", f"{det} {subj} {act} {s3}{end}")
            add(2, tok, cls, "flagged", "named-only", f"{det} {subj} {act} {s2}{end}")
            # Case 4, in the places the old look-ahead missed
            form = k % 8
            if form == 0:
                add(4, tok, cls, "flagged", "possessive-later", f"{det} {subj} {act} {s3}, {pron} {bare} "
                    f"catching the light.")
            elif form == 1:
                add(4, tok, cls, "flagged", "with-after-object", f"{det} {subj} {act} {s3}, with {look}.")
            elif form == 2:
                add(4, tok, cls, "flagged", "relative-whose", f"{det} {subj}, whose {bare} "
                    f"stands out, {act} {s3}.")
            elif form == 3:
                add(4, tok, cls, "flagged", "later-sentence", f"{det} {subj} {act} {s3}. {pron.capitalize()} "
                    f"{lnoun} is {rnd.choice(adjs)}.")
            elif form == 4:
                add(4, tok, cls, "flagged", "pronoun-has", f"{det} {subj} {act} {s3}; "
                    f"{'it' if pron == 'its' else ('she' if pron == 'her' else 'he')} has {look}.")
            elif form == 5:
                add(4, tok, cls, "flagged", "subject-possessive", f"The {subj}'s {bare} "
                    f"stands out as it {THIRD[act]} {s3}.")
            elif form == 6:
                add(4, tok, cls, "flagged", "copula-later", f"{det} {subj} {act} {s3}. The {cls} is "
                    f"{rnd.choice(adjs)}.")
            else:
                add(4, tok, cls, "flagged", "appositive", f"{det} {subj}, a {rnd.choice(adjs)} one, {act} {s3}.")
            # Case 4 right at the subject: repaired (the words are cut), not flagged
            if k % 4 == 0:
                add(4, tok, cls, "repaired", "adjective-before", f"A {rnd.choice(adjs)} {subj} {act} {s3}.")
            if k % 4 == 1:
                add(4, tok, cls, "repaired", "with-right-after", f"A {subj} with {look} {THIRD[act]} {s3}.")
            # hard negatives: someone else's looks, the subject's body as a place
            if k % 3 == 0:
                add(3, tok, cls, "ok", "other-being-looks", f"{det} {subj} {act} {s3} "
                    f"{OTHERS[kind][k % len(OTHERS[kind])]}{end}")
            if k % 5 == 2 and kind != "object":
                add(3, tok, cls, "ok", "body-as-place", f"{det} {subj} {act} {s3}, a blue ribbon tied around "
                    f"{pron} {'neck' if kind != 'person' else 'wrist'}.")
            if k % 5 == 4:
                add(3, tok, cls, "ok", "object-possessive", f"{det} {subj} {act} next to a ceramic bowl, its "
                    f"glossy surface reflecting the light from a tall window{end}")
        for cap in (f"a photo of {subj}", f"A {subj}", f"A {subj}.", f"a close-up photo of a {subj}",
                    f"An image of a {subj}", f"A {subj} {ACTIONS[kind][0]}.", f"a {subj} {ACTIONS[kind][1]} outside"):
            add(1, tok, cls, "flagged", "class-only", cap)
    tok, cls = STYLE
    for k, (c3, c2) in enumerate(STYLE_CONTENT):
        add(3, tok, cls, "ok", "style-sid", f"A painting in the style of {tok} {cls} showing {c3}.")
        add(2, tok, cls, "flagged", "style-named-only", f"A painting in the style of {tok} {cls} showing {c2}.")
        add(4, tok, cls, "flagged", "style-describes-style",
            f"A painting in the style of {tok} {cls} {STYLE_LEAKS[k % len(STYLE_LEAKS)]} showing {c3}.")
    add(1, tok, cls, "flagged", "class-only", f"a painting in the style of {tok} {cls}")
    return out


def main() -> None:
    path = Path(__file__).with_name("sid_captions.tsv")
    lines = ["case\ttoken\tclass\texpected\tform\tcaption"]
    lines += ["\t".join(str(x) for x in r) for r in rows()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(lines) - 1} captions -> {path}")


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------- reading and scoring (tests, benchmark)
def load_table(path: Path | None = None) -> list[dict]:
    import csv

    path = path or Path(__file__).with_name("sid_captions.tsv")
    with open(path, encoding="utf-8", newline="") as f:
        return [dict(r, case=int(r["case"])) for r in csv.DictReader(f, delimiter="\t")]


def caught(check) -> bool:
    """The checker did not pass the caption as SID: flagged, or repaired by cutting words about the subject."""
    return check.flagged or any("described the subject" in c for c in check.changes)


def score(table: list[dict]) -> dict:
    """Precision and recall of 'not a SID caption as written' (Case 1, 2, 4) against Case 3, plus the
    share of rows whose status is exactly the expected one, overall and per form."""
    from unconfused.engine.captions import sid

    tp = fp = fn = tn = exact = 0
    forms: dict[str, list[int]] = {}
    misses = []
    for r in table:
        c = sid.check_caption(r["caption"], r["token"], r["class"], mode="style" if r["class"] == "art" else "subject")
        truth, got = r["case"] != 3, caught(c)
        tp += truth and got
        fp += got and not truth
        fn += truth and not got
        tn += not truth and not got
        ok = c.status == r["expected"]
        exact += ok
        f = forms.setdefault(f"case {r['case']} {r['form']}", [0, 0])
        f[0] += ok
        f[1] += 1
        if not ok:
            misses.append((r, c))
    return {"n": len(table), "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
            "specificity": tn / max(tn + fp, 1), "exact": exact / max(len(table), 1),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn, "forms": forms, "misses": misses}
