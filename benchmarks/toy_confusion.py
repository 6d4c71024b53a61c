"""The papers' confusion experiment in the toy world (engine/evaluation/toyworld.py), measured by its oracle.

1. Base model: quality (object recall, attribute accuracy) on one- and two-object prompts of its
   vocabulary, and CLIF's confusion degree (paper section 3 / A.2) of two-object prompts, by kind
   of pair (same shape, same colour, different in both) next to the text features' cosine.
2. Personal concepts never in the training world - <a-ball> (purple striped ball) and <b-ball>
   (orange striped ball), two of one class - from 5 "photos" each, then "a photo of <a-ball> ball
   and <b-ball> ball" measured by the oracle (presence of each, both = attendance, confusion
   degree, leakage: what stands where each concept should be), and identity fidelity (each alone).
   Methods, each over several seeds, through the pack's public trainers:
     baseline  tokens + LoRA (trainers/lora.py) on the photos with their exact masks
     clif      CLIF (trainers/clif.py) on G/M-augmented data (bank drawn by the toy model), then
               tokens + LoRA on the photos + Mix pairs, as the flagship flow does
     em        the mask EM (trainers/em.py) on pictures holding both concepts, no masks given;
               against `em_base`: the same pictures, tokens + LoRA without masks
     sid       SID captions: every photo of <a-ball> also shows a green box (the bias); Case 1
               ("a photo of <a-ball> ball"), Case 3 (+ "next to a green box on sand": the
               scripted captioner knows the scene) and Case 4 (+ the subject's own colour and
               pattern); measured: identity fidelity and how often the green box comes along
               uninvited (entanglement)

    .venv/bin/python benchmarks/toy_confusion.py [--quick] [--seeds 3] [--methods ...] [--json PATH]

--json PATH also writes the headline numbers (read by benchmarks/run_all.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from unconfused.engine import host
from unconfused.engine.evaluation import toyworld as tw

TOKENS = tw.DEMO_TOKENS  # <a-ball>: purple striped ball, <b-ball>: orange striped ball (the demo's two)
A, B = TOKENS.values()
PAIR_PROMPT = tw.pair_prompt(TOKENS)  # "a photo of <a-ball> ball and <b-ball> ball"
COMPANION = ("green", "plain", "box")
METHODS = ("baseline", "clif", "em", "sid")


def _img(scene) -> torch.Tensor:
    return torch.from_numpy(scene.image).float() / 255


def generate(bundle, prompts: list[str], seeds: list[int], steps: int, cfg: float) -> torch.Tensor:
    return tw.draw(bundle, prompts, seeds, steps, cfg)


# ---------------------------------------------------------------- 1. the base model
def base_quality(bundle, oracle, n: int, steps: int, cfg: float) -> dict:
    """Object recall and attribute accuracy on one- and two-object prompts of the vocabulary."""
    from unconfused.engine.evaluation import oracle as O

    rng = np.random.default_rng(0)
    colours, out = list(tw.COLOURS), {}
    for k in (1, 2):
        prompts, wanted = [], []
        for i in range(n):
            objs = []
            while len(objs) < k:
                c = (colours[rng.integers(len(colours))], tw.PATTERNS[rng.integers(2)], tw.SHAPES[rng.integers(4)])
                if c not in tw.HELD_OUT and c not in objs:
                    objs.append(c)
            words = [" ".join([c[0]] + (["striped"] if c[1] == "striped" else []) + [c[2]]) for c in objs]
            prompts.append(" and ".join(tw.article(w) for w in words) + f" on {list(tw.GROUNDS)[i % 3]}")
            wanted.append(objs)
        imgs = generate(bundle, prompts, list(range(n)), steps, cfg)
        dets = oracle.detect(imgs)
        reps = [O.prompt_report([d], w) for d, w in zip(dets, wanted)]
        out[f"{k}_object"] = {key: float(np.mean([r[key] for r in reps])) for key in reps[0]}
        out[f"{k}_object"]["examples"] = [[p, [x.concept for x in d]] for p, d in zip(prompts[:4], dets[:4])]
    return out


def base_confusion(bundle, oracle, scorer, n: int, steps: int, cfg: float) -> dict:
    """CLIF's confusion degree of 'a X and a Y' over pairs of known objects, by kind of pair."""
    import torch.nn.functional as F
    from unconfused.engine.evaluation import oracle as O

    kinds = {"same shape": [(("red", "plain", "ball"), ("blue", "plain", "ball")),
                            (("green", "plain", "box"), ("yellow", "plain", "box")),
                            (("orange", "plain", "ring"), ("purple", "plain", "ring"))],
             "same colour": [(("red", "plain", "ball"), ("red", "plain", "box")),
                             (("blue", "plain", "ring"), ("blue", "plain", "pyramid")),
                             (("yellow", "plain", "box"), ("yellow", "plain", "ring"))],
             "different": [(("red", "plain", "ball"), ("blue", "plain", "box")),
                           (("green", "plain", "ring"), ("orange", "plain", "pyramid")),
                           (("yellow", "plain", "pyramid"), ("purple", "plain", "ball"))]}
    out = {}
    for kind, pairs in kinds.items():
        rows = []
        for a, b in pairs:
            pa, pb = f"{a[0]} {a[2]}", f"{b[0]} {b[2]}"
            imgs = generate(bundle, [f"a {pa} and a {pb}"] * n, list(range(n)), steps, cfg)
            dets = oracle.detect(imgs)
            rep = O.pair_report(dets, a, b)
            if a[0] != b[0]:  # the colours tell them apart: the same measures by colour alone
                rep.update(O.pair_report(dets, a, b, attrs=("colour",), suffix="_colour"))
            with torch.no_grad():
                f = F.normalize(bundle.text_encoder(bundle.tokenize([f"a {pa}", f"a {pb}"])).pooler_output, dim=-1)
            rep["text_cosine"] = float(f[0] @ f[1])
            rows.append(rep)
        keys = ["confusion_degree", "both", "leak_rate", "text_cosine"]
        keys += [k + "_colour" for k in keys[:3] if k + "_colour" in rows[0]]
        out[kind] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    return out


# ---------------------------------------------------------------- 2. personal concepts
def concept_set(photos: dict[str, list], captions: dict[str, list[str]] | None = None):
    from unconfused.engine.data.concepts import Concept, make_concept_set

    out = []
    for token, scenes in photos.items():
        c = Concept(token, TOKENS[token][2], [_img(s) for s in scenes],
                    masks=[torch.from_numpy(s.masks[0]).float() for s in scenes])
        if captions and token in captions:
            c = c.with_captions(captions[token])
        out.append(c)
    return make_concept_set(out)


def lora_settings(name: str, seed: int, steps: int, **kw):
    from unconfused.trainers.lora import LoraSettings

    base = {**tw.LORA, "name": name, "steps": steps, "seed": seed, "export": False}
    base.update(kw)
    return LoraSettings(**base)


def train_baseline(bundle, photos, seed: int, steps: int, work: Path):
    from unconfused.trainers.lora import train_lora

    cs = concept_set(photos)
    return train_lora(bundle.clone(), cs, lora_settings(f"base-{seed}", seed, steps), run_root=work,
                      class_words={t: TOKENS[t][2] for t in photos}).bundle


def toy_bank(bundle, folder: Path, steps: int, cfg: float):
    """A common-concept bank drawn by the toy model in its own words, matted by the plain ground."""
    from unconfused.engine.data.augment.bank import bank_from_folder
    from unconfused.engine.data.concepts import tensor_to_pil

    phrases = ["green box", "blue ring", "red pyramid", "yellow ball", "blue box", "red ring"]
    if not (folder / "done").is_file():
        prompts = [f"a {p} on {g}" for p in phrases for g in ("snow", "sand")]
        imgs = generate(bundle, prompts, list(range(len(prompts))), steps, cfg)
        for i, (p, img) in enumerate(zip(prompts, imgs)):
            label = p.split(" on ")[0].removeprefix("a ").split()[-1]
            (folder / label).mkdir(parents=True, exist_ok=True)
            tensor_to_pil(img).save(folder / label / f"{i:03d}.png")
        (folder / "done").write_text("ok")
    return bank_from_folder(folder, input="bank")


def train_clif_method(bundle, photos, tower, bank, seed: int, steps: int, clif_steps: int, work: Path):
    from unconfused.engine.data.augment.build import AugmentSettings, build_dataset
    from unconfused.engine.data.augmented_dataset import Dataset
    from unconfused.engine.data.training_examples import examples_from_concept_set
    from unconfused.trainers.clif import ClifSettings, train_clif
    from unconfused.trainers.lora import train_lora

    cs = concept_set(photos)
    aug = AugmentSettings(**tw.AUGMENT, seed=seed)
    built = build_dataset(cs, work / f"clif-data-{seed}", aug, bank=bank)
    ds = Dataset(built.folder)
    clif = train_clif(bundle.clone(), ds, tower, ClifSettings(
        **{**tw.CLIF, "name": f"clif-{seed}", "steps": clif_steps, "seed": seed, "export": False}), run_root=work)
    examples = examples_from_concept_set(cs) + list(ds.examples(("mix",)))
    return train_lora(clif.bundle, examples, lora_settings(f"clif-lora-{seed}", seed, steps), run_root=work,
                      class_words={t: TOKENS[t][2] for t in photos}).bundle


def pair_pictures(n: int, seed: int):
    """Pictures holding both concepts (for the EM), with their exact masks."""
    import random

    rng = random.Random(f"pairs:{seed}")
    out = []
    for i in range(n):
        objs = tw.place(rng, [(A[2], A[0], A[1], "big"), (B[2], B[0], B[1], "big")])
        ground = list(tw.GROUNDS)[i % 3]
        img, masks = tw.paint(objs, ground)
        out.append(tw.Scene(objs, ground, "", masks, img))
    return out


def train_em_method(bundle, seed: int, steps: int, work: Path, masks_from_em: bool = True):
    from unconfused.engine.data.training_examples import Example
    from unconfused.trainers.em import EMSettings, make_scenes, train_em
    from unconfused.trainers.lora import train_lora

    pics = pair_pictures(4, seed)
    concepts = [[("<a-ball>", "ball"), ("<b-ball>", "ball")] for _ in pics]
    if not masks_from_em:
        ex = [Example(_img(p), PAIR_PROMPT, None, list(TOKENS)) for p in pics]
        return train_lora(bundle.clone(), ex, lora_settings(f"em-base-{seed}", seed, steps), run_root=work,
                          class_words={t: "ball" for t in TOKENS}).bundle, None
    gt = [torch.from_numpy(m).float() for p in pics for m in p.masks]
    scenes = make_scenes([_img(p) for p in pics], concepts, gt)
    s = EMSettings(name=f"em-{seed}", steps=steps, resolution=64, rank=4, alpha=4.0, unet_lr=1e-3, token_lr=5e-3,
                   batch_size=2, checkpoint_every=0, seed=seed, export=False, flip=False,
                   tokens_only_steps=max(1, steps // 4), reestimate_every=max(1, steps // 4), init_timesteps=20,
                   crf_at="off", template="a photo of {token}")
    res = train_em(bundle.clone(), scenes, s, run_root=work)
    iou = res.rounds[-1].iou if res.rounds and getattr(res.rounds[-1], "iou", None) else None
    return res.bundle, iou


def train_sid_method(bundle, seed: int, steps: int, case: str, work: Path):
    """<a-ball> photos that always show a green box too; captions by case (SID Table 1)."""
    import random

    from unconfused.trainers.lora import train_lora
    rng = random.Random(f"sid:{seed}")
    scenes = []
    for i in range(5):
        objs = tw.place(rng, [(A[2], A[0], A[1], "big"), (COMPANION[2], COMPANION[0], COMPANION[1], "small")])
        ground = list(tw.GROUNDS)[i % 3]
        img, masks = tw.paint(objs, ground)
        scenes.append(tw.Scene(objs, ground, "", masks, img))
    caps = {"case1": "a photo of <a-ball> ball",
            "case3": "a photo of <a-ball> ball next to a green box on {g}",
            "case4": "a photo of <a-ball> purple striped ball next to a green box on {g}"}[case]
    from unconfused.engine.data.training_examples import Example

    # no masks: the bias object is in the pictures the model learns from, as in the SID paper
    ex = [Example(_img(s), caps.format(g=s.ground), None, ["<a-ball>"]) for s in scenes]
    return train_lora(bundle.clone(), ex, lora_settings(f"sid-{case}-{seed}", seed, steps), run_root=work,
                      class_words={"<a-ball>": "ball"}).bundle


SCORER: dict = {}  # the toy CLIP and the concepts' photos, for the pack's own metrics


def measure_pair(bundle, oracle, n: int, steps: int, cfg: float, seed: int) -> dict:
    from unconfused.engine.evaluation import metrics as M

    rep, pictures = tw.measure_concepts(bundle, oracle, TOKENS, n, seed, steps, cfg)
    if SCORER:  # the pack's CLIP-T and CLIP-I with the toy CLIP
        refs = [M.Reference(t, TOKENS[t][2], [_img(s) for s in sc], [torch.from_numpy(s.masks[0]).float() for s in sc])
                for t, sc in SCORER["photos"].items()]
        ev = M.evaluate(list(pictures), [PAIR_PROMPT] * n, refs, SCORER["clip"])
        rep["clip_t"] = ev.value("clip_t")
        rep["clip_i"] = float(np.mean([ev.value("clip_i", t) for t in TOKENS]))
    return rep


def measure_sid(bundle, oracle, n: int, steps: int, cfg: float, seed: int) -> dict:
    from unconfused.engine.evaluation import oracle as O

    seeds = [1000 * seed + i for i in range(n)]
    dets = oracle.detect(generate(bundle, ["a photo of <a-ball> ball"] * n, seeds, steps, cfg))
    return {"fidelity": sum(any(O.is_concept(d, A) for d in ds) for ds in dets) / n,
            "colour_fidelity": sum(any(d.colour == A[0] for d in ds) for ds in dets) / n,
            "companion_leak": sum(any(d.shape == COMPANION[2] and d.colour == COMPANION[0] for d in ds)
                                  for ds in dets) / n}


def _agg(rows: list[dict]) -> dict:
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and k != "images"]
    out = {}
    for k in keys:
        vals = [r[k] for r in rows]
        out[k] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                  "runs": [round(v, 4) for v in vals]}
    return out


@host.named("toy_confusion")
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one seed, few steps and pictures (a smoke run)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds first..first+seeds-1 (split a run over "
                    "processes, then --merge their JSON files)")
    ap.add_argument("--merge", nargs="+", help="combine the JSON files of split runs into one table")
    ap.add_argument("--methods", default=",".join(("base",) + METHODS))
    ap.add_argument("--lora-steps", type=int, default=150)
    ap.add_argument("--clif-steps", type=int, default=60)
    ap.add_argument("--images", type=int, default=12, help="pictures per prompt and seed")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default=None, help="folder with toy-sd/, toy-clip.safetensors, oracle.safetensors "
                    "(default: the committed ones)")
    ap.add_argument("--work", default=None, help="run folders (default: a temp folder)")
    ap.add_argument("--json", help="also write the headline numbers as JSON to this path")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    if args.quick:
        args.seeds, args.lora_steps, args.clif_steps, args.images, args.sample_steps = 1, 6, 3, 2, 4
    torch.set_num_threads(args.threads)
    import tempfile

    from unconfused.engine import host
    from unconfused.engine.vision.clip_image_tower import tower_from_scorer
    from unconfused.engine.evaluation.oracle import Oracle

    work = Path(args.work or tempfile.mkdtemp(prefix="toy_confusion_"))
    host.configure(models_dir=work / "models", output_dir=work / "output", temp_dir=work / "temp")
    (work / "temp").mkdir(parents=True, exist_ok=True)
    wdir = Path(args.weights) if args.weights else tw.WEIGHTS_DIR
    bundle = tw.load_toy_bundle(wdir / "toy-sd")
    oracle, scorer = Oracle.load(wdir / "oracle.safetensors"), tw.load_toy_clip(wdir / f"{tw.CLIP_NAME}.safetensors")
    methods = args.methods.split(",")
    photos = {t: tw.concept_photos(c, 5, seed=0) for t, c in TOKENS.items()}
    SCORER.update(clip=scorer, photos=photos)
    res: dict = {"settings": vars(args).copy(), "results": {}}
    t0 = time.time()
    gen = (args.sample_steps, args.cfg)
    if "base" in methods:
        res["results"]["base_quality"] = base_quality(bundle, oracle, max(4, args.images * 2), *gen)
        res["results"]["base_confusion"] = base_confusion(bundle, oracle, scorer, args.images, *gen)
        res["results"]["untrained_tokens"] = _agg([measure_pair(bundle, oracle, args.images, *gen, seed=0)])
        print(json.dumps(res["results"], indent=1, default=str), flush=True)
    tower = tower_from_scorer(scorer) if "clif" in methods else None
    bank = toy_bank(bundle, work / "bank", *gen) if "clif" in methods else None
    runs: dict[str, list] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for m in methods:
            t = time.time()
            if m == "baseline":
                runs.setdefault(m, []).append(measure_pair(train_baseline(bundle, photos, seed, args.lora_steps, work),
                                                           oracle, args.images, *gen, seed=seed))
            elif m == "clif":
                b = train_clif_method(bundle, photos, tower, bank, seed, args.lora_steps, args.clif_steps, work)
                runs.setdefault(m, []).append(measure_pair(b, oracle, args.images, *gen, seed=seed))
            elif m == "em":
                b, iou = train_em_method(bundle, seed, args.lora_steps, work)
                r = measure_pair(b, oracle, args.images, *gen, seed=seed)
                if iou:
                    r["mask_iou"] = float(np.mean(list(iou.values())))
                runs.setdefault(m, []).append(r)
                b, _ = train_em_method(bundle, seed, args.lora_steps, work, masks_from_em=False)
                runs.setdefault("em_base", []).append(measure_pair(b, oracle, args.images, *gen, seed=seed))
            elif m == "sid":
                for case in ("case1", "case3", "case4"):
                    b = train_sid_method(bundle, seed, args.lora_steps, case, work)
                    runs.setdefault(f"sid_{case}", []).append(measure_sid(b, oracle, args.images, *gen, seed=seed))
            else:
                continue
            print(f"seed {seed} {m}: {time.time() - t:.0f} s", flush=True)
    for name, rows in runs.items():
        res["results"][name] = _agg(rows)
    res["runs"] = runs
    res["seconds"] = round(time.time() - t0, 1)
    print(table(res))
    write(res, args.json)
    return res


def merge(paths: list[str], out: str | None) -> dict:
    """One result from split runs: their per-seed rows pooled, base results from whichever has them."""
    res: dict = {"settings": {}, "results": {}, "runs": {}}
    for p in paths:
        d = json.loads(Path(p).read_text())["details"]
        res["settings"] = d.get("settings", res["settings"])
        for k, v in d["results"].items():
            if k.startswith("base_") or k == "untrained_tokens":
                res["results"][k] = v
        for k, rows in d.get("runs", {}).items():
            res["runs"].setdefault(k, []).extend(rows)
    for name, rows in res["runs"].items():
        res["results"][name] = _agg(rows)
    print(table(res))
    write(res, out)
    return res


def write(res: dict, path: str | None) -> None:
    if path:
        from _results import headline, write_json

        r = res["results"]
        heads = []
        if "base_confusion" in r:
            for kind, v in r["base_confusion"].items():
                heads.append(headline(f"base_confusion_{kind.replace(' ', '_')}", f"base confusion degree, {kind}",
                                      quality=f"{v['confusion_degree']:.3f}"))
        for name in ("baseline", "clif", "em", "em_base"):
            if name in r:
                heads.append(headline(f"{name}_both", f"{name}: both concepts present",
                                      quality=f"{r[name]['both']['mean']:.3f} +- {r[name]['both']['sd']:.3f}"))
        write_json(path, {"benchmark": "toy_confusion", "settings": res["settings"],
                          "details": {"settings": res["settings"], "results": r, "runs": res.get("runs", {})},
                          "headline": heads})


def table(res: dict) -> str:
    r = res["results"]
    cols = [("both", "both present (all attributes)"), ("both_colour", "both present (colour)"),
            ("present_a_colour", "A present (colour)"), ("present_b_colour", "B present (colour)"),
            ("confusion_degree_colour", "confusion degree (colour)"), ("leak_rate_colour", "leak rate (colour)"),
            ("fidelity", "fidelity (all)"), ("colour_fidelity", "fidelity (colour)"), ("clip_t", "CLIP-T"),
            ("clip_i", "CLIP-I"), ("mask_iou", "EM mask IoU")]
    lines = ["| method | " + " | ".join(c for _, c in cols) + " |", "|---" * (len(cols) + 1) + "|"]

    def f(row, k):
        return f"{row[k]['mean']:.2f} ± {row[k]['sd']:.2f}" if k in row else "-"
    for name in ("untrained_tokens", "baseline", "clif", "em_base", "em"):
        if name in r:
            row = dict(r[name])
            if "colour_fidelity_a-ball" in row and "colour_fidelity" not in row:
                row["colour_fidelity"] = {s: (row["colour_fidelity_a-ball"][s] + row["colour_fidelity_b-ball"][s]) / 2
                                          for s in ("mean", "sd")}
            lines.append(f"| {name} | " + " | ".join(f(row, k) for k, _ in cols) + " |")
    if any(k.startswith("sid_") for k in r):
        lines += ["", "| SID captions | fidelity | colour fidelity | companion comes along |", "|---|---|---|---|"]
        for case in ("case1", "case3", "case4"):
            if f"sid_{case}" in r:
                row = r[f"sid_{case}"]
                lines.append(f"| {case} | {f(row, 'fidelity')} | {f(row, 'colour_fidelity')} | "
                             f"{f(row, 'companion_leak')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
