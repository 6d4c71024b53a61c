"""SID - selectively informative descriptions (papers/sid-selectively-informative-description.md).

A SID caption (the paper's Case 3) names the subject only as "<token> <class>" and describes
every *other* thing in the photo in detail - nearby objects, what the subject holds or wears,
the surface, the background, the light - so those things align with their own words instead of
leaking into the subject token. Describing the subject's own looks (Case 4: "a <v> dog with
fluffy brown fur") moves identity out of the token and is refused here.

This module holds the instruction given to the vision-language model and the validation and
repair of every caption (also hand-written ones). Nothing here talks to a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import UnconfusedError

# ----------------------------------------------------------------------------------------------
# The instruction. The authors' own text is not published (except the style variant, appendix
# C.1); this one is written from the Case 3 definition. Placeholders: {subject} = "<token> <class>",
# {class_word}.

SUBJECT_INSTRUCTION = (
    "Describe this photo in one or two sentences, in detail.\n"
    "The main subject is the {class_word}. Refer to it only with the exact words \"{subject}\" "
    "(write it exactly like that, once, with no other word describing it), for example "
    "\"a {subject} sitting on ...\".\n"
    "Do NOT describe the {class_word} itself: no colour, fur, hair, skin, eyes, breed, age, size, "
    "shape, material, pattern or markings of the {class_word}.\n"
    "DO describe everything else in detail: every object near it or touching it, anything it "
    "wears or holds (collar, clothes, glasses, toys), what it stands or lies on, the background "
    "and the place, with their colours, materials, patterns, text and brands.\n"
    "Answer with the description only."
)

STYLE_INSTRUCTION = (
    "Describe the image in one sentence in detail. Start the sentence with "
    "\"A painting in the style of {subject}\". Describe what the picture shows - the people, "
    "animals, objects, places and what they do - but do not describe the style of the painting "
    "itself: no brushwork, technique, medium, colour palette or art movement.\n"
    "Answer with the sentence only."
)

POSE_SENTENCE = (
    "Also say the {class_word}'s pose and facial expression (for example sitting, lying down, "
    "smiling, mouth open, eyes closed, looking to the left), but still nothing else about how "
    "the {class_word} looks."
)

MODES = ["subject", "style"]
ON_FLAGGED = ["use template caption", "keep as written", "stop with an error"]
BASELINE_TEMPLATE = "a photo of {subject}"  # the paper's Case 1 (DreamBooth)
STYLE_BASELINE_TEMPLATE = "a painting in the style of {subject}"


def subject_phrase(token: str, class_word: str) -> str:
    return f"{token.strip()} {class_word.strip()}".strip()


def default_instruction(mode: str = "subject") -> str:
    if mode not in MODES:
        raise UnconfusedError(f"unknown mode '{mode}'; use one of {MODES}", input="mode")
    return STYLE_INSTRUCTION if mode == "style" else SUBJECT_INSTRUCTION


def build_instruction(token: str, class_word: str, *, mode: str = "subject", describe_pose: bool = False,
                      text: str | None = None) -> str:
    """The instruction for one concept. `text` is the user's (editable) instruction with the
    placeholders {subject} and {class_word}; empty = the built-in one for `mode`. In style mode
    the built-in subject instruction is swapped for the style one (the node shows the subject one)."""
    template = (text or "").strip() or default_instruction(mode)
    if mode == "style" and template == SUBJECT_INSTRUCTION.strip():
        template = STYLE_INSTRUCTION
    if describe_pose and mode == "subject":
        template = template + "\n" + POSE_SENTENCE
    try:
        return template.replace("{subject}", subject_phrase(token, class_word)).replace(
            "{class_word}", class_word.strip())
    except Exception as e:  # pragma: no cover - str.replace does not fail
        raise UnconfusedError(f"the instruction could not be filled in: {e}", input="instruction")


def template_caption(token: str, class_word: str, template: str = BASELINE_TEMPLATE) -> str:
    """The baseline caption (paper Case 1): placeholders {subject}, {token}, {class_word}."""
    if "{subject}" not in template and "{token}" not in template:
        raise UnconfusedError("the template must contain {subject} (or {token}), e.g. 'a photo of {subject}'", input="template")
    return (template.replace("{subject}", subject_phrase(token, class_word))
            .replace("{token}", token.strip()).replace("{class_word}", class_word.strip()))


# ----------------------------------------------------------------------------------------------
# Validation and repair.

# Other words VLMs use for common classes; a mention of these is the subject just like the class word.
SYNONYMS: dict[str, list[str]] = {
    "dog": ["puppy", "pup", "doggy", "doggo", "canine", "hound"],
    "cat": ["kitten", "kitty", "feline"],
    "woman": ["lady", "girl", "female"],
    "man": ["guy", "gentleman", "male"],
    "person": ["individual", "human"],
    "boy": ["child", "kid"],
    "girl": ["child", "kid"],
    "child": ["kid", "toddler"],
    "teddybear": ["teddy bear", "teddy", "stuffed bear", "plush bear"],
    "teddy bear": ["teddy", "stuffed bear", "plush bear"],
    "toy": ["plush", "figure", "figurine"],
    "sunglasses": ["glasses", "shades", "eyewear"],
    "backpack": ["bag", "rucksack"],
    "car": ["vehicle"],
    "vase": ["pot", "jar"],
    "bird": ["parrot"],
    "art": ["artwork", "artist", "painter"],
}

# Words between a determiner and the subject that say how the subject looks (Case 4 leakage).
# Any word in that place is treated as an attribute unless it is a known harmless word.
_HARMLESS_MODIFIERS = {"same", "one", "single", "main"}
_DETERMINERS = {"a", "an", "the", "this", "that", "one", "our", "my", "your"}
_STOP = {"of", "in", "on", "at", "with", "and", "or", "to", "from", "by", "for", "next", "near", "is", "are",
         "was", "were", "sits", "sitting", "stands", "standing", "lies", "lying", "beside", "behind", "under",
         "over", "while", "as", "its", "his", "her", "their", "it", "photo", "picture", "image", "painting",
         "style", "close-up", "closeup", "shot", "portrait", "view", "two", "three", "four", "several", "many",
         "some", "other", "another", "both", "few"} | _DETERMINERS

# Nouns that are the subject's own body or looks. After "with/has/its/his/her..." right after the
# subject they describe the subject; what it wears or holds is a separate object and is welcome.
APPEARANCE_NOUNS = ["fur", "coat", "hair", "hairs", "eyes", "eye", "ears", "ear", "tail", "snout", "nose", "muzzle",
                    "face", "skin", "feathers", "plumage", "paws", "paw", "whiskers", "mane", "markings", "spots",
                    "stripes", "patches", "freckles", "complexion", "beard", "mustache", "moustache", "eyebrows",
                    "lips", "teeth", "body", "build", "physique", "features", "coloring", "colouring", "color",
                    "colour", "pattern", "texture", "finish", "surface", "petals", "bark", "scales", "horns",
                    "antlers", "wings", "legs", "head", "cheeks", "chin", "forehead", "fringe", "bangs",
                    "curls", "braid", "braids", "ponytail", "pigtails"]
# Pose / expression nouns that are allowed when the pose option is on (paper appendix D.2).
POSE_NOUNS = {"eyes", "eye", "ears", "ear", "tail", "paws", "paw", "legs", "head", "face", "mouth", "tongue"}
STYLE_WORDS = ["brushstroke", "brushstrokes", "brush strokes", "brushwork", "impasto", "impressionist",
               "impressionism", "expressionist", "cubist", "cubism", "surrealist", "watercolor", "watercolour",
               "gouache", "pastel colors", "pastel colours", "oil on canvas", "palette", "vibrant colors",
               "vibrant colours", "bold colors", "bold colours", "color scheme", "colour scheme", "art style",
               "art nouveau", "pointillism", "pointillist", "thick paint", "linework", "line work", "cel-shaded",
               "cel shaded", "flat shading", "painterly"]
_REFUSALS = re.compile(r"^\s*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i'?m unable|i am unable|as an ai|"
                       r"unfortunately,? i)", re.I)
_PREAMBLE = re.compile(r"^\s*(sure[,!.]?|certainly[,!.]?|of course[,!.]?|okay[,!.]?|ok[,!.]?)?\s*"
                       r"((here is|here's|here are)[^:\n]*:|(the )?(caption|description|answer|sid)\s*:)\s*",
                       re.I)
LOOK_ADJECTIVES = ("small|large|big|tiny|fluffy|furry|shaggy|fat|thin|slim|young|old|elderly|tall|short|cute|"
                   "black|white|brown|golden|grey|gray|red|orange|yellow|green|blue|purple|pink|beige|tan|cream|"
                   "spotted|striped|curly|blond|blonde|bald|muscular|shiny|matte|wooden|metal|plastic|ceramic|"
                   "beautiful|pretty|handsome|adorable|wrinkled|freckled|tanned|pale|dark-haired|long-haired|"
                   "short-haired|red-haired|fair-skinned|dark-skinned")
MAX_WORDS = 60  # CLIP reads 75 tokens; a longer caption is cut in training


# ---- who owns a look noun that is not right after the subject ("its golden fur", "whose ears",
# "... grass. Its fur is golden.", "next to a ball, with floppy ears"). Body nouns belong to living
# things (and toys with faces); generic look nouns (colour, pattern, material) to anything.
PERSON_WORDS = ["woman", "women", "man", "men", "person", "people", "girl", "girls", "boy", "boys", "child",
                "children", "kid", "kids", "baby", "lady", "ladies", "guy", "guys", "owner", "toddler", "player",
                "rider", "chef", "farmer", "student", "worker", "someone", "mother", "father", "grandmother",
                "grandfather", "friend", "friends", "couple", "family", "teenager", "adult"]
ANIMAL_WORDS = ["dog", "dogs", "puppy", "puppies", "cat", "cats", "kitten", "kittens", "bird", "birds", "horse",
                "horses", "cow", "cows", "sheep", "goat", "goats", "rabbit", "rabbits", "bunny", "hamster", "parrot",
                "duck", "ducks", "squirrel", "fox", "bear", "teddy", "doll", "dolls", "pony", "chicken", "pigeon",
                "deer", "lamb", "poodle", "retriever", "terrier", "corgi", "labrador", "beagle", "husky", "tabby"]
PERSON_CLASSES = {"woman", "man", "person", "girl", "boy", "child", "kid", "baby", "lady", "guy", "people"}
GENERIC_LOOK_NOUNS = ["color", "colour", "colors", "colours", "coloring", "colouring", "pattern", "patterns",
                      "texture", "finish", "surface", "material", "materials", "shape", "breed",
                      "glaze", "paint", "paintwork", "fabric", "size", "build", "physique", "complexion"]
_LOCATION_PREPS = {"on", "around", "over", "in", "into", "onto", "across", "behind", "under", "against", "from",
                   "between", "to", "at", "by", "near", "beside", "through", "off", "above", "below", "toward",
                   "towards", "along", "upon", "inside", "underneath", "beneath", "within", "covering", "covers"}
_POSSESSIVES = {"its", "his", "her", "their"}
_OWNER_VERBS = {"with", "having", "has", "have", "whose"}
# Words that say something specific about a thing (colour, material, pattern, texture, size, shape,
# state, light, number): the paper's "informative specification" (Case 3 vs Case 2).
DETAIL_WORDS = set("""
red orange yellow green blue purple violet pink brown black white grey gray beige tan cream golden gold silver
navy teal turquoise maroon crimson scarlet olive khaki ivory bronze copper lavender magenta cyan amber burgundy
mint peach coral charcoal dark light pale bright colorful colourful multicolored multicoloured rainbow pastel
neon transparent clear
wooden wood metal metallic steel iron brass chrome aluminum aluminium glass ceramic porcelain clay terracotta
plastic rubber leather suede cotton wool woolen woollen knitted knit linen silk satin velvet denim nylon canvas
paper cardboard wicker rattan bamboo stone marble granite concrete brick tiled cobblestone gravel sandy straw
plush fleece lace woven felt corduroy tweed vinyl asphalt wrought stainless quilted embroidered
striped plaid checkered checked tartan floral flowered dotted spotted patterned paisley geometric zigzag
fluffy soft rough smooth shiny glossy matte polished worn weathered rusty rusted old new vintage antique modern
rustic cozy cosy tidy messy cluttered wet dry muddy dusty snowy frosty icy grassy leafy mossy rocky lush sunny
sunlit shady shaded cloudy overcast rainy foggy misty dim dimly lit glowing calm busy crowded empty
small large big tiny huge tall short long wide narrow round square rectangular oval circular triangular curved
folded crumpled stacked potted framed blooming flowering autumn autumnal winter summer spring evening morning
sunset dusk twilight golden-hour warm cool cold hot fresh ripe dried fallen bare tangled thick thin
two three four five six seven eight nine ten dozen several pair
cherry oak pine palm maple birch willow bamboo rose roses tulip tulips sunflower sunflowers daisy daisies
burning melting broken torn scattered half-full
""".split())
_DETAIL_HYPHEN = re.compile(r"\b[a-z]+-(?:colored|coloured|striped|patterned|shaped|sized|toned|lit|covered|"
                            r"and-[a-z]+|haired|made|framed|painted)\b", re.I)


def _sentences(t: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence (split after . ! ? ; followed by a space)."""
    out, start = [], 0
    for m in re.finditer(r"[.!?;]\s+", t):
        out.append((start, m.end()))
        start = m.end()
    return out + [(start, len(t))]


def _subject_description(t: str, subject: str, class_word: str, *, allow_pose: bool = False) -> str | None:
    """Words anywhere in the caption that describe the subject's own looks, or None.

    A look noun ("fur", "ears", "colour", "breed") counts when the subject owns it: after a possessive
    ("its/his/her/their ..."), after "with/has/having/whose", or as "the dog's ...". The owner is the
    nearest thing mentioned before that can own it (a body part needs a living thing or a toy; a
    possessive pronoun must agree: "her" prefers a person, "its" a thing or an animal); a pronoun
    that opens a later sentence refers to the subject. "on its head" (a place) and, with the pose
    option, pose words without a look adjective ("ears perked up") do not count. Also "it is
    fluffy", "the dog looks golden"."""
    start = t.find(subject)
    if start < 0:
        return None
    cw = class_word.strip().lower()
    subj_person = cw in PERSON_CLASSES or any(w in PERSON_CLASSES for w in SYNONYMS.get(cw, []))
    body = [n for n in APPEARANCE_NOUNS if n not in GENERIC_LOOK_NOUNS]
    if subj_person:
        body = [n for n in body if n != "coat"]  # a person's coat is clothing
    nouns = body + [n for n in GENERIC_LOOK_NOUNS if n not in body]
    look_adj = re.compile(rf"(?i)^(?:{LOOK_ADJECTIVES})$")
    sents = _sentences(t)

    # things mentioned in the caption: (position, kind) with kind subject | person | animal | thing
    mentions: list[tuple[int, int, str]] = [(start, start + len(subject), "subject")]
    cls_alt = _word_alt([cw] + SYNONYMS.get(cw, []))
    for m in re.finditer(rf"(?i)\b(?P<det>the|this|that)\s+(?:{cls_alt})\b(?:'s)?", t):
        if m.start() > start:
            mentions.append((m.start(), m.end(), "subject"))
    person_alt = _word_alt(PERSON_WORDS)
    animal_alt = _word_alt(ANIMAL_WORDS)
    for kind, alt in (("person", person_alt), ("animal", animal_alt)):
        for m in re.finditer(rf"(?i)\b(?:{alt})\b", t):
            if start <= m.start() < start + len(subject) or any(a <= m.start() < b for a, b, k in mentions
                                                                 if k == "subject"):
                continue
            mentions.append((m.start(), m.end(), kind))
    for m in re.finditer(r"(?i)\b(?:a|an|the|another|some|two|three|several|other|its|his|her|their)\s+"
                         r"(?:[\w-]+\s+){0,3}?(?P<n>[a-z-]{3,})\b", t):
        if not any(a <= m.start("n") < b for a, b, _ in mentions):
            mentions.append((m.start("n"), m.end("n"), "thing"))
    mentions.sort()

    def owner(pos: int, word: str, is_body: bool) -> str:
        w = word.lower()
        kinds = {"subject", "person", "animal"} if is_body else {"subject", "person", "animal", "thing"}
        if w in ("her", "his", "he", "she"):
            wanted = [{"person"} | ({"subject"} if subj_person else set()), {"subject", "animal"}]
        elif w in ("its", "it"):
            wanted = [kinds - {"person"} - ({"subject"} if subj_person else set())]
        else:
            wanted = [kinds]
        sent_start = max(a for a, _ in sents if a <= pos)
        opens = w in ("its", "his", "her", "their", "it", "he", "she", "they") and \
            not t[sent_start:pos].strip(" ,\"'")
        for want in wanted:
            want = want & kinds
            if opens and sent_start > start:
                prev = [k for a, _, k in mentions if a < sent_start and k in want]
                if prev:  # a pronoun opening a sentence refers to the caption's topic (first mention)
                    return prev[0]
            before = [k for a, b, k in mentions if b <= pos and k in want]
            if before:
                return before[-1]
        return "none"

    mods = r"(?P<mods>(?:(?!(?:its|his|her|their)\b)[\w-]+,?\s+){0,3}?)"  # "with its ears": the possessive
    noun_alt = _word_alt(nouns)
    pat = re.compile(rf"(?i)\b(?P<own>its|his|her|their|with|having|has|have|whose|"
                     rf"(?:the|this|that)\s+(?:{cls_alt})'s|{re.escape(subject)}'s)\s+{mods}(?P<noun>{noun_alt})\b")
    for m in pat.finditer(t):
        if m.start() < start:
            continue
        noun, own = m.group("noun").lower(), m.group("own").lower()
        words = [w.strip(",").lower() for w in m.group("mods").split()]
        if any(w in _STOP - _POSSESSIVES - {"a", "an", "the"} or w in _POSSESSIVES for w in words):
            continue  # "with a ball in its ...": another phrase
        is_body = noun not in GENERIC_LOOK_NOUNS
        if allow_pose and noun in POSE_NOUNS and not any(look_adj.match(w) for w in words):
            continue
        before = t[:m.start()].split()
        if own in _POSSESSIVES and before and before[-1].lower().strip(",") in _LOCATION_PREPS:
            continue  # "a bandana around its head": a place
        pron = re.search(r"(?i)\b(it|he|she|they)\s+$", t[:m.start()])
        if own.endswith("'s"):
            who = "subject"
        elif own in _POSSESSIVES:
            who = owner(m.start(), own, is_body)
        elif own in ("has", "have") and pron:  # "it has floppy ears"
            who = owner(pron.start(), pron.group(1), is_body)
        elif own == "with" and t[:m.start()].rstrip().endswith(","):
            # ", with long ears" is set off from the nearest noun: it says more about the sentence's
            # own subject (the first thing its sentence names)
            sent_start = max(a for a, _ in _sentences(t) if a <= m.start())
            first = [k for a, _, k in mentions if sent_start <= a < m.start()]
            who = first[0] if first else owner(m.start(), "", is_body)
        else:
            who = owner(m.start(), "", is_body)
        if who == "subject":
            return m.group(0)
    # "it is fluffy", "The dog looks golden", "she is young"
    cop = re.compile(rf"(?i)\b(?P<who>it|he|she|they|(?:the|this|that)\s+(?:{cls_alt}))\s+"
                     rf"(?:is|are|looks|appears|seems)\s+(?:very\s+|quite\s+|rather\s+|so\s+)?(?:{LOOK_ADJECTIVES})\b")
    for m in cop.finditer(t):
        if m.start() <= start:
            continue
        w = m.group("who").lower()
        if w in ("it", "he", "she", "they"):
            if owner(m.start(), w, False) == "subject":
                return m.group(0)
        else:
            return m.group(0)
    return None


def _detail_words(t: str, subject: str) -> list[str]:
    """The words of the caption that specify something other than the subject (the minimum detail
    rule): colour, material, pattern, texture, size, shape, state, light, number, a hyphenated
    modifier ("rust-coloured"), quoted text or a brand/name (a capitalised word inside a sentence)."""
    rest = t.replace(subject, " ")
    found = [w for w in re.findall(r"[A-Za-z]+(?:-[A-Za-z]+)*", rest) if w.lower() in DETAIL_WORDS]
    found += _DETAIL_HYPHEN.findall(rest)
    found += re.findall(r"\b\d+\b", rest) + re.findall(r"[\"\u201c][^\"\u201d]{2,}[\"\u201d]", rest)
    for a, b in _sentences(rest):
        words = rest[a:b].split()
        found += [w for w in words[1:] if re.match(r"^[A-Z][a-z]+", w) and w.lower().strip(",.") not in
                  ("a", "i") and not w.startswith(("A ", "The "))]
    return found


@dataclass
class CaptionCheck:
    """The outcome for one caption: the caption to use, what was changed, and what is still wrong."""

    index: int
    original: str
    caption: str
    status: str  # "ok" | "repaired" | "flagged"
    changes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # why it is flagged
    warnings: list[str] = field(default_factory=list)  # worth a look, not flagged
    uninformative: bool = False  # flagged by the minimum detail rule (paper Case 1/2), nothing else wrong

    @property
    def flagged(self) -> bool:
        return self.status == "flagged"

    def line(self) -> str:
        head = f"#{self.index} {self.status.upper() if self.flagged else self.status}"
        notes = ([f"changed: {c}" for c in self.changes] + [f"PROBLEM: {p}" for p in self.problems]
                 + [f"note: {w}" for w in self.warnings])
        return head + (": " + "; ".join(notes) if notes else "") + f"\n    {self.caption}"


def _word_alt(words: list[str]) -> str:
    words = sorted({w.lower() for w in words if w}, key=len, reverse=True)
    return "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in words)


def _class_alternatives(class_word: str) -> list[str]:
    cw = class_word.strip().lower()
    alts = [cw] + SYNONYMS.get(cw, [])
    plural = []
    for a in alts:
        if not a.endswith("s"):
            plural.append(a + ("es" if a.endswith(("sh", "ch", "x")) else "s"))
    return alts + plural


def _token_variants(token: str, class_word: str = "") -> re.Pattern:
    """The token as written, or mangled the way VLMs mangle it: other case, brackets dropped or
    swapped ("<sks>", "sks", "[sks]", "(sks)", "< sks >"). The bare core must be a word of its own."""
    core = token.strip()
    inner = core.strip("<>[](){}")
    if not inner:
        return re.compile(re.escape(core), re.I)
    if inner.lower() in class_word.lower().split():  # "<rc>" + "rc car": only bracketed spellings
        pat = rf"[<\[({{]\s*{re.escape(inner)}\s*[>\])}}]"
    else:
        pat = rf"(?:[<\[({{]\s*)?(?<![\w-]){re.escape(inner)}(?![\w-])(?:\s*[>\])}}])?"
    if inner != core:
        pat = rf"{re.escape(core)}|{pat}"
    return re.compile(pat, re.I)


def _normalise_text(text: str, changes: list[str]) -> str:
    t = (text or "").replace("\r", "\n")
    t2 = re.sub(r"(?is)<think>.*?(</think>|$)", "", t)  # reasoning models (Qwen3, DeepSeek-R1 style)
    if t2 != t:
        changes.append("removed the model's <think> reasoning")
        t = t2
    t2 = re.sub(r"(?m)^\s*(?:[-*\u2022]|\d+[.)])\s+", "", t)  # list bullets
    if t2 != t:
        changes.append("removed list bullets")
        t = t2
    t2 = re.sub(r"[*_`#]+", "", t)  # markdown
    if t2 != t:
        changes.append("removed markdown")
    t = t2
    m = _PREAMBLE.match(t)
    if m and m.end() < len(t):
        changes.append(f"removed the preamble {m.group(0).strip()!r}")
        t = t[m.end():]
    t = re.sub(r"\s+", " ", t).strip()
    for q in ('"', "'", "\u201c\u201d", "\u2018\u2019"):
        o, c = (q[0], q[-1])
        if len(t) > 2 and t[0] == o and t[-1] == c and t.count(o if o == c else c) <= 2:
            t = t[1:-1].strip()
            changes.append("removed surrounding quotes")
            break
    return t


def _fix_articles(t: str, subject: str) -> str:
    # "an <sks> dog" -> "a <sks> dog" (the token is read as a new word; 'a' is what DreamBooth uses)
    return re.sub(rf"\b([Aa])n(\s+{re.escape(subject)})", r"\1\2", t)


def check_caption(text: str, token: str, class_word: str, *, mode: str = "subject", allow_pose: bool = False,
                  index: int = 0, require_detail: bool = True) -> CaptionCheck:
    """Validate one caption and repair what can be repaired safely.

    Rules (paper Case 3): the subject phrase "<token> <class>" occurs exactly once; nothing says
    how the subject looks (adjectives before it, "with brown fur" after it, "its/her ... eyes");
    in style mode the caption must not describe the style. Repairs: markdown, quotes and
    preambles removed; a mangled token fixed; "the brown dog" / "a puppy" turned into the subject
    phrase (the dropped words are reported); repeated mentions turned into "it"; looks right
    after the subject ("with fluffy brown fur") cut. What cannot be repaired is flagged: looks
    described anywhere else ("its golden fur", "whose ears", a later "Its fur is golden."), and
    (`require_detail`) a caption that fails the minimum detail rule - it must give at least one
    specific detail (colour, material, pattern, texture, size, shape, state, light, number, text or
    brand) of something other than the subject; "a <v> dog" (Case 1) or "a <v> dog on a bed" (Case 2)
    do not, and leave the bed and the background to leak into the token.
    """
    token, class_word = token.strip(), class_word.strip()
    subject = subject_phrase(token, class_word)
    changes: list[str] = []
    problems: list[str] = []
    warnings: list[str] = []
    original = text if isinstance(text, str) else str(text)
    t = _normalise_text(original, changes)

    def result(status: str) -> CaptionCheck:
        return CaptionCheck(index, original, t, status, changes, problems, warnings)

    if not t:
        problems.append("the caption is empty")
        return result("flagged")
    if _REFUSALS.match(t):
        problems.append("the model refused or apologised instead of describing the photo")
        return result("flagged")
    letters = sum(ch.isalpha() for ch in t)
    if letters < 0.5 * len(t) or len(t.split()) < 3 or re.search(r"(\b\w+\b)(?:\s+\1\b){3,}", t, re.I):
        problems.append("the caption is not a sentence (too short, mostly symbols or repeating words)")
        return result("flagged")

    cw = class_word.lower()
    class_alt = _word_alt([cw] + SYNONYMS.get(cw, []))  # singular: plural mentions are other things
    all_class_alt = _word_alt(_class_alternatives(class_word))
    tok_re = _token_variants(token, class_word)

    # 1. Mangled token spellings -> the exact token.
    def fix_token(m: re.Match) -> str:
        return token

    mangled = [m.group(0) for m in tok_re.finditer(t) if m.group(0) != token]
    t = tok_re.sub(fix_token, t)
    if mangled:
        changes.append(f"wrote {', '.join(repr(x) for x in dict.fromkeys(mangled))} as the token {token!r}")
    tok_exact = re.compile(re.escape(token))

    if not tok_exact.search(t):
        # 2. No token: the first mention of the class ("the brown dog", "a puppy") becomes the subject.
        # (style mode: the class word "art" is no name for the style in the content - "an artist at work")
        stop_alt = "|".join(sorted((re.escape(w) for w in _STOP - {"and", "or"}), key=len, reverse=True))
        m = None if mode == "style" else re.search(
            rf"(?i)\b(?:(?P<det>{'|'.join(_DETERMINERS)})\s+)?"
            rf"(?P<mods>(?:(?!(?:{stop_alt})\b)[\w'-]+,?\s+){{0,4}}?)"
            rf"(?P<cls>{class_alt})\b(?!-)", t)
        if m is None and mode == "style":
            t = f"A painting in the style of {subject}. " + t
            changes.append(f"added 'A painting in the style of {subject}' (the caption did not name the style)")
        elif m is None:
            problems.append(f"the caption does not mention the subject: neither {token!r} nor one "
                            f"{class_word} appears; write '{subject}' where the {class_word} is described")
            return result("flagged")
        else:
            # the words between the determiner and the class word say how the subject looks
            attrs = [w.strip(",") for w in m.group("mods").split()]
            det = m.group("det")
            prefix = ""
            det_out = ""
            if det:
                det_out = (("A " if det[0].isupper() else "a ") if det.lower() in ("a", "an") else det + " ")
            new = f"{prefix}{det_out}{subject}"
            if m.start() == 0 and new[:1].islower() and not new.startswith(token):
                new = new[0].upper() + new[1:]
            t = t[: m.start()] + new + t[m.end():]
            said = m.group(0).strip()
            changes.append(f"replaced {said!r} with the subject phrase {subject!r}")
            if attrs:
                changes.append(f"dropped {' '.join(attrs)!r} (it described the subject)")
    else:
        # 3. Token present: make sure the class word follows it.
        def fix_class(mm: re.Match) -> str:
            return subject

        after = re.compile(rf"{re.escape(token)}(?:\s+(?P<cls>{class_alt})\b(?!-))?", re.I)
        pieces = []
        for mm in after.finditer(t):
            if mm.group("cls") is None:
                pieces.append(f"added the class word after {token!r}")
            elif mm.group("cls") != class_word:
                pieces.append(f"wrote {mm.group('cls')!r} as the class word {class_word!r}")
        t = after.sub(fix_class, t)
        changes.extend(dict.fromkeys(pieces))

    # 4. Adjectives between the determiner and the subject ("a fluffy brown <sks> dog") say how it looks.
    stop_alt = "|".join(sorted((re.escape(w) for w in _STOP | _HARMLESS_MODIFIERS), key=len, reverse=True))
    adj_re = re.compile(rf"(?i)\b(?P<det>{'|'.join(_DETERMINERS)})\s+(?P<mods>(?:(?!(?:{stop_alt})\b)[\w'-]+,?\s+){{1,4}})"
                        rf"{re.escape(subject)}")
    m = adj_re.search(t)
    if m:
        mods = [w.strip(",") for w in m.group("mods").split()]
        if not any(w.lower() in _STOP for w in mods) and not any(w.lower() in _HARMLESS_MODIFIERS for w in mods):
            det = "a" if m.group("det").lower() == "an" else m.group("det")
            t = t[: m.start()] + f"{det} {subject}" + t[m.end():]
            changes.append(f"dropped {' '.join(mods)!r} before {subject!r} (it described the subject)")
    # possessive / adjective right before the token without a determiner: "Fluffy <sks> dog"
    m = re.match(rf"(?P<mods>(?:[A-Za-z'-]+,?\s+){{1,3}}){re.escape(subject)}", t)
    if m and not any(w.strip(",").lower() in _STOP for w in m.group("mods").split()):
        mods = m.group("mods").strip()
        t = subject + t[m.end():]
        changes.append(f"dropped {mods!r} before {subject!r} (it described the subject)")

    # 5. Exactly once: later mentions of the subject phrase become "it".
    occ = list(re.finditer(re.escape(subject), t))
    if len(occ) > 1:
        first_end = occ[0].end()
        head, tail = t[:first_end], t[first_end:]
        tail, n = re.subn(rf"(?i)\b(?:(?:the|a|an|this|that)\s+)?{re.escape(subject)}('s)?",
                          lambda mm: "its" if mm.group(1) else "it", tail)
        t = head + tail
        changes.append(f"the subject phrase appeared {len(occ)} times; later mentions became 'it'")

    # 6. Looks described after the subject: "<sks> dog with fluffy brown fur and floppy ears".
    appearance = [n for n in APPEARANCE_NOUNS if not (allow_pose and n in POSE_NOUNS)]
    app_alt = _word_alt(appearance)
    with_re = re.compile(rf"(?i){re.escape(subject)}(?P<clause>,?\s+(?:with|having|that has|who has|which has)\s+"
                         rf"(?:(?:[\w'-]+\s+){{0,3}}(?:{app_alt})\b(?:\s*,?\s*(?:and\s+)?)?)+)")
    m = with_re.search(t)
    if m:
        clause = m.group("clause")
        t = t[: m.start("clause")] + (" " if not t[m.end("clause"):].startswith((",", ".", " ")) else "") + \
            t[m.end("clause"):]
        t = re.sub(r"\s+([,.])", r"\1", re.sub(r"\s{2,}", " ", t)).strip()
        changes.append(f"cut {clause.strip(' ,')!r} (it described the subject)")
    esc = re.escape(subject)
    leak = _subject_description(t, subject, class_word, allow_pose=allow_pose)
    if leak:
        problems.append(f"describes the subject's own looks ('{leak}'); a SID caption must not describe the "
                        "subject (paper Case 4 destroys its identity) - remove those words")
    leak_res = [] if leak else [
        (rf"(?i){esc}'s\s+(?:[\w-]+\s+){{0,3}}(?:{app_alt})\b", "describes the subject's own looks ('{}')"),
        (rf"(?i){esc}(?:(?!\b(?:a|an|the|another|some|two|three|several|other)\b)[^.;]){{0,60}}?"
         rf"\b(?:has|have|with|having|its|his|her|their)\s+(?:[\w-]+\s+){{0,3}}"
         rf"(?:{app_alt})\b", "describes the subject's own looks ('{}')"),
        (rf"(?i){esc}\s+(?:is|looks|appears|seems)\s+(?:very\s+|quite\s+|rather\s+)?(?:{LOOK_ADJECTIVES})\b",
         "says how the subject looks ('{}')"),
        (rf"(?i){esc},\s+(?:(?:very|quite|rather|and)\s+)?(?:{LOOK_ADJECTIVES})\b",
         "says how the subject looks ('{}')"),
        (rf"(?i){esc},\s+(?:a|an)\s+[^,.]{{2,40}},", "adds a description of the subject ('{}')"),
    ]
    for pat, msg in leak_res:
        mm = re.search(pat, t)
        if mm:
            problems.append(msg.format(mm.group(0)) + "; a SID caption must not describe the subject "
                            "(paper Case 4 destroys its identity) - remove those words")
            break

    # 7. Style mode: no words about the style itself.
    if mode == "style":
        hits = [w for w in STYLE_WORDS if re.search(rf"(?i)\b{re.escape(w)}\b", t)]
        if hits:
            problems.append(f"describes the style itself ({', '.join(hits)}); a style caption describes only "
                            "the content - remove those words")

    # 8. Final count (a caption that only *looked* like the subject phrase, e.g. 'dogs', stays flagged).
    n = len(re.findall(re.escape(subject), t))
    if n != 1:
        problems.append(f"the subject phrase {subject!r} appears {n} times (it must appear exactly once)")
    fixed = _fix_articles(t, subject)
    if fixed != t:
        changes.append(f"wrote 'a' before {subject!r}")
        t = fixed

    # 9. Notes that do not flag.
    others = [] if mode == "style" else re.findall(rf"(?i)\b(?:{all_class_alt})\b", t.replace(subject, ""))
    if others:
        warnings.append(f"also mentions {', '.join(repr(o) for o in dict.fromkeys(others))} - fine if that is "
                        f"another {class_word}, rewrite it if it is the subject")
    words = len(t.split())
    if words > MAX_WORDS:
        pos = len(t[: t.find(subject)].split()) if subject in t else 0
        warnings.append(f"{words} words: CLIP reads only about the first 75 tokens, the rest is cut in training"
                        + (f" (the subject phrase is word {pos + 1})" if pos > 50 else ""))
    if require_detail and not problems and not _detail_words(t, subject):
        what = "the painting's content" if mode == "style" else f"the things around the {class_word}"
        problems.append(f"uninformative (paper Case 1/2): it names no specific detail of {what}. Minimum "
                        "detail rule: describe at least one other object, surface or the background with a "
                        "specific attribute (colour, material, pattern, texture, size, shape, state, light, "
                        "number, text or brand), e.g. 'on a red plaid blanket'")
        return CaptionCheck(index, original, t, "flagged", changes, problems, warnings, uninformative=True)
    if problems:
        return result("flagged")
    return result("repaired" if changes else "ok")


def check_captions(captions: list[str], token: str, class_word: str, *, mode: str = "subject",
                   allow_pose: bool = False, require_detail: bool = True) -> list[CaptionCheck]:
    return [check_caption(c, token, class_word, mode=mode, allow_pose=allow_pose, index=i,
                          require_detail=require_detail) for i, c in enumerate(captions)]


def resolve_flagged(checks: list[CaptionCheck], token: str, class_word: str, *, on_flagged: str,
                    template: str = BASELINE_TEMPLATE) -> list[str]:
    """The captions to train on. Flagged ones become the template caption (reported), stay as
    written (reported), or stop the run with the list of problems. An uninformative caption is
    kept rather than replaced: the template (Case 1) is no more informative than it."""
    if on_flagged not in ON_FLAGGED:
        raise UnconfusedError(f"unknown choice '{on_flagged}'; use one of {ON_FLAGGED}",
                              input="on_flagged")
    flagged = [c for c in checks if c.flagged]
    if flagged and on_flagged == "stop with an error":
        detail = "; ".join(f"#{c.index}: {', '.join(c.problems)}" for c in flagged[:5])
        raise UnconfusedError(f"{len(flagged)} of {len(checks)} captions of {token} cannot be used as SID "
                              f"captions ({detail}). Edit them (backend 'manual'), caption again, or set "
                              "on_flagged to 'use template caption'", input="on_flagged")
    out = []
    for c in checks:
        if c.flagged and on_flagged == "use template caption" and c.uninformative:
            out.append(c.caption)
            c.warnings.append("kept as written: the template caption would be no more informative")
        elif c.flagged and on_flagged == "use template caption":
            out.append(template_caption(token, class_word, template))
            c.warnings.append(f"trained with the template caption {out[-1]!r} instead")
        else:
            out.append(c.caption)
    return out


def report(checks: list[CaptionCheck], token: str) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "repaired", "flagged")}
    head = (f"{token}: {len(checks)} captions - {counts['ok']} ok, {counts['repaired']} repaired, "
            f"{counts['flagged']} flagged")
    return "\n".join([head] + [c.line() for c in checks])
