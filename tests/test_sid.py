"""SID captions: instruction text, validation and repair on a table of realistic captions, storage."""

from unconfused.engine import host
import pytest
import torch

from unconfused.engine.data import concepts as C
from unconfused.engine.captions import sid
from unconfused.engine.errors import UnconfusedError

DOG = ("<sks>", "dog")
WOMAN = ("<alice>", "woman")
STYLE = ("<vg>", "art")

# (token/class, caption as a VLM or a user wrote it, expected status, text the result must contain,
#  text the result must not contain)
TABLE = [
    # --- good: used as written
    (DOG, "A <sks> dog sitting next to a black Prada purse with silver hardware on white sheets.", "ok",
     "a black Prada purse", None),
    (DOG, "a <sks> dog lying on a red plaid blanket in front of a brick fireplace", "ok", None, None),
    (DOG, "The <sks> dog wears a blue nylon collar with a round brass tag, on a wet sandy beach at sunset.",
     "ok", "blue nylon collar", None),
    (DOG, "A <sks> dog running on green grass beside a woman with long brown hair holding a frisbee.", "ok",
     "woman with long brown hair", None),
    (WOMAN, "A <alice> woman holding a white ceramic mug in a cafe with wooden tables and hanging plants.", "ok",
     None, None),
    (WOMAN, "A <alice> woman wearing a yellow raincoat stands under a green umbrella on a rainy street.", "ok",
     "yellow raincoat", None),
    (DOG, "A <sks> dog next to another dog, a small white poodle, on a grey sofa.", "ok", "poodle", None),
    (STYLE, "A painting in the style of <vg> art showing a fishing boat on a calm lake with two men.", "ok",
     None, None),
    (DOG, "A <sks> dog sitting on a wooden porch, looking to the left.", "ok", None, None),
    # --- repairable
    (DOG, "A brown dog sitting next to a black leather purse on white sheets.", "repaired", "A <sks> dog sitting",
     "brown"),
    (DOG, "The fluffy golden dog lies on a red plaid blanket by a fireplace.", "repaired", "The <sks> dog lies",
     "fluffy"),
    (DOG, "A puppy playing with an orange rubber ball on a green lawn.", "repaired", "A <sks> dog playing",
     "puppy"),
    (DOG, "A photo of a small brown dog on a grey couch with a striped pillow.", "repaired",
     "A photo of a <sks> dog on a grey couch", "small"),
    (DOG, "A <SKS> dog on a wooden bench in a park with autumn leaves.", "repaired", "A <sks> dog on", "<SKS>"),
    (DOG, "A sks dog on a wooden bench in a park with autumn leaves.", "repaired", "A <sks> dog on", None),
    (DOG, "A [sks] dog sitting in a wicker basket with a blue blanket.", "repaired", "A <sks> dog sitting", "[sks]"),
    (DOG, "A <sks> sitting in a wicker basket with a blue blanket.", "repaired", "A <sks> dog sitting", None),
    (DOG, "A <sks> puppy sitting in a wicker basket with a blue blanket.", "repaired", "A <sks> dog sitting",
     "puppy"),
    (DOG, "An <sks> dog on a rocky beach next to a red bucket.", "repaired", "A <sks> dog on", "An <sks>"),
    (DOG, "A fluffy <sks> dog on a rocky beach next to a red bucket.", "repaired", "A <sks> dog on", "fluffy"),
    (DOG, "\"A <sks> dog on a rocky beach next to a red bucket.\"", "repaired", "A <sks> dog on", '"'),
    (DOG, "Sure! Here is the caption: A <sks> dog on a rocky beach next to a red bucket.", "repaired",
     "A <sks> dog on a rocky", "Sure"),
    (DOG, "**A <sks> dog** on a rocky beach next to a red bucket.", "repaired", "A <sks> dog on", "**"),
    (DOG, "A <sks> dog with fluffy brown fur and floppy ears sits on a blue couch.", "repaired",
     "A <sks> dog sits on a blue couch", "fur"),
    (DOG, "A <sks> dog sits on a blue couch; the <sks> dog is next to a red pillow.", "repaired",
     "it is next to a red pillow", None),
    (WOMAN, "A young woman with long blonde hair sits at a marble table in a busy cafe.", "repaired",
     "A <alice> woman sits at a marble table", "blonde"),
    (WOMAN, "Caption: A lady in a red coat walking past a bakery window full of bread.", "repaired",
     "A <alice> woman in a red coat", "lady"),
    (STYLE, "A painting in the style of <vg> showing sunflowers in a clay vase on a table.", "repaired",
     "in the style of <vg> art showing", None),
    (STYLE, "A quiet harbour with three sailing boats and a lighthouse on a hill.", "repaired",
     "A painting in the style of <vg> art.", None),
    (("<sg>", "sunglasses"), "A pair of pink sunglasses resting on a glossy magazine next to a red lipstick.",
     "repaired", "A pair of <sg> sunglasses resting", "pink"),
    (("<tb>", "teddy bear"), "A brown teddy bear sitting on a wooden shelf between two blue books.", "repaired",
     "A <tb> teddy bear sitting", "brown"),
    (("<rc>", "rc car"), "A red RC car on a dirt track with orange traffic cones.", "repaired",
     "A <rc> rc car on a dirt track", "red"),
    (DOG, "<think>The user wants a caption. The dog is brown.</think>A <sks> dog on a red rug by a piano.",
     "repaired", "A <sks> dog on a red rug", "think"),
    (DOG, "1. A <sks> dog on a red rug beside a black upright piano.", "repaired", "A <sks> dog on", "1."),
    (STYLE, "An artist at work at an easel in a sunny studio with a cat on the floor.", "repaired",
     "A painting in the style of <vg> art. An artist at work", None),
    # --- unrepairable: flagged
    (DOG, "", "flagged", None, None),
    (DOG, "I'm sorry, but I can't help with identifying this image.", "flagged", None, None),
    (DOG, "a a a a a a a a", "flagged", None, None),
    (DOG, "A cozy living room with a grey sofa and a striped rug.", "flagged", None, None),
    (DOG, "A <sks> dog, which is sitting on grass, has a shiny black coat and a white patch.", "flagged", None, None),
    (DOG, "The <sks> dog's thick golden fur shines in the sun on a green lawn.", "flagged", None, None),
    (DOG, "A <sks> dog is fluffy and white, sitting on a red carpet.", "flagged", None, None),
    (WOMAN, "A <alice> woman smiling, her long blonde hair blowing in the wind, on a beach.", "flagged", None,
     None),
    (DOG, "A <sks> dog, a golden retriever, sitting on a wooden dock by a lake.", "flagged", None, None),
    (STYLE, "A painting in the style of <vg> art with bold brushstrokes and a vibrant colors palette showing a "
            "field.", "flagged", None, None),
    (DOG, "#### ---- **** 12345 ???? !!!!", "flagged", None, None),
]


@pytest.mark.parametrize("who,text,status,has,hasnt", TABLE, ids=[f"{i}-{r[2]}" for i, r in enumerate(TABLE)])
def test_caption_table(who, text, status, has, hasnt):
    token, cls = who
    check = sid.check_caption(text, token, cls, mode="style" if cls == "art" else "subject")
    assert check.status == status, check.line()
    if has:
        assert has in check.caption, check.line()
    if hasnt:
        assert hasnt not in check.caption, check.line()
    if status == "repaired":
        assert check.changes, check.line()  # every repair says what it changed
    if status == "flagged":
        assert check.problems
    else:
        assert check.caption.count(f"{token} {cls}") == 1, check.line()


# The captions the old look-ahead passed (issue 17) and the Case 1/2 ones it let through.
LEAKS = [
    "A <sks> dog lying in a garden, its golden fur shining.",
    "A <sks> dog next to a red ball, with long floppy ears.",
    "A <sks> dog whose golden fur glows in the sun sits on a red plaid blanket.",
    "A <sks> dog lying on short green grass. Its fur is golden.",
    "A <sks> dog on a blue rug by a brick fireplace; it has a curly brown coat.",
    "A <sks> dog on a blue rug by a brick fireplace. The dog is fluffy.",
    "The <sks> dog's ears are floppy as it sits on a red plaid blanket.",
    "A <sks> dog next to a red ball, with its long floppy ears.",
]


@pytest.mark.parametrize("text", LEAKS)
def test_subject_descriptions_found_anywhere(text):
    c = sid.check_caption(text, "<sks>", "dog")
    assert c.status == "flagged" and not c.uninformative, c.line()
    assert "subject" in c.problems[0] and "Case 4" in c.problems[0]


@pytest.mark.parametrize("text", ["A <sks> dog", "a photo of <sks> dog", "A <sks> dog on a bed.",
                                  "A <sks> dog sitting next to a purse on sheets."])
def test_uninformative_captions_flagged(text):
    c = sid.check_caption(text, "<sks>", "dog")
    assert c.status == "flagged" and c.uninformative, c.line()
    assert "Minimum detail rule" in c.problems[0] and "Case 1/2" in c.problems[0]
    # the baseline on purpose: the rule can be switched off
    assert sid.check_caption(text, "<sks>", "dog", require_detail=False).status in ("ok", "repaired")


@pytest.mark.parametrize("text", [
    "A <sks> dog running on green grass beside a woman with long brown hair holding a frisbee.",
    "A <sks> dog wearing a blue bandana tied around its head, on a wooden deck.",
    "A <sks> dog next to a woman on a red bench. Her hair is long and blonde.",
    "A <sks> dog next to a ceramic bowl, its glossy surface reflecting the light.",
])
def test_other_things_looks_are_not_the_subjects(text):
    assert sid.check_caption(text, "<sks>", "dog").status == "ok"


def test_uninformative_kept_rather_than_replaced_by_the_template():
    checks = sid.check_captions(["A <sks> dog on a bed.", "I'm sorry, I cannot."], "<sks>", "dog")
    caps = sid.resolve_flagged(checks, "<sks>", "dog", on_flagged="use template caption")
    assert caps == ["A <sks> dog on a bed.", "a photo of <sks> dog"]
    assert "no more informative" in checks[0].line()


def test_generated_case_table_precision_recall():
    """Several hundred captions written from the paper's Case 1-4 definitions (tests/data/
    sid_captions.tsv): flagging 'not SID as written' keeps precision and recall high (measured
    1.000 / 0.979 on 743 rows: the misses are ', its glossy glaze' after another object, which is ambiguous,
    and 'a market square')."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from sid_make_captions import load_table, score

    table = load_table()
    assert len(table) >= 500 and {r["case"] for r in table} == {1, 2, 3, 4}
    s = score(table)
    assert s["precision"] >= 0.97 and s["recall"] >= 0.95 and s["exact"] >= 0.95, (
        s["precision"], s["recall"], [(r["caption"], c.status) for r, c in s["misses"][:10]])
    for case in (1, 2, 3):  # every Case 1/2 caption flagged, every plain SID caption passed
        forms = {k: v for k, v in s["forms"].items() if k.startswith(f"case {case} ") and "style" not in k}
        assert all(ok == n for ok, n in forms.values()), forms


def test_table_is_big_enough():
    assert len(TABLE) >= 30
    assert {r[2] for r in TABLE} == {"ok", "repaired", "flagged"}


def test_pose_option_allows_expression():
    text = "A <alice> woman smiling with her eyes closed, sitting on a park bench under a cherry tree."
    assert sid.check_caption(text, "<alice>", "woman", allow_pose=True).status == "ok"
    assert sid.check_caption(text, "<alice>", "woman", allow_pose=False).status == "flagged"


def test_instruction_variants():
    base = sid.build_instruction("<sks>", "dog")
    assert '"<sks> dog"' in base and "Do NOT describe the dog" in base and "{" not in base
    pose = sid.build_instruction("<sks>", "dog", describe_pose=True)
    assert "facial expression" in pose and "facial expression" not in base
    style = sid.build_instruction("<vg>", "art", mode="style", text=sid.SUBJECT_INSTRUCTION)
    assert style.startswith("Describe the image in one sentence") and "<vg> art" in style
    assert "brushwork" in style
    own = sid.build_instruction("<sks>", "dog", text="Caption {subject}; ignore the {class_word}.")
    assert own == "Caption <sks> dog; ignore the dog."
    with pytest.raises(UnconfusedError):
        sid.build_instruction("<sks>", "dog", mode="sideways")


def test_template_and_flagged_policy():
    assert sid.template_caption("<sks>", "dog") == "a photo of <sks> dog"
    checks = sid.check_captions(["A <sks> dog on a red rug.", "I'm sorry, I cannot."], "<sks>", "dog")
    caps = sid.resolve_flagged(checks, "<sks>", "dog", on_flagged="use template caption")
    assert caps == ["A <sks> dog on a red rug.", "a photo of <sks> dog"]
    assert "template caption" in checks[1].line()
    kept = sid.resolve_flagged(checks, "<sks>", "dog", on_flagged="keep as written")
    assert kept[1].startswith("I'm sorry")
    with pytest.raises(UnconfusedError) as e:
        with host.running_node(name="N"):
            sid.resolve_flagged(checks, "<sks>", "dog", on_flagged="stop with an error")
    assert "on_flagged" in str(e.value) and "#1" in str(e.value)
    text = sid.report(checks, "<sks>")
    assert "1 ok, 0 repaired, 1 flagged" in text and "FLAGGED" in text
    with pytest.raises(UnconfusedError):
        sid.template_caption("<sks>", "dog", "a photo")


def test_captions_saved_as_sidecars_and_read_back(tmp_path):
    imgs = torch.rand(2, 16, 16, 3)
    concept = C.make_concept("<sks>", "dog", imgs)
    checks = sid.check_captions(["A brown dog on a red rug.", "A <sks> dog under a table."], "<sks>", "dog")
    caps = sid.resolve_flagged(checks, "<sks>", "dog", on_flagged="use template caption")
    cs = C.make_concept_set([concept.with_captions(caps)])
    C.save_concept_set(cs, tmp_path / "set")
    txt = sorted((tmp_path / "set").rglob("*.txt"))
    assert [p.read_text().strip() for p in txt] == ["A <sks> dog on a red rug.", "A <sks> dog under a table."]
    back = C.load_concept_set(tmp_path / "set")
    assert back.concepts[0].captions == caps
    from unconfused.engine.data.training_examples import examples_from_concept_set
    ex = examples_from_concept_set(back)
    assert [e.caption for e in ex] == caps
    base = examples_from_concept_set(back, captions="template")
    assert base[0].caption == "a photo of <sks> dog"  # the Case 1 baseline for comparison
