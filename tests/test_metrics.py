"""Evaluation metrics: known answers on controlled inputs (injected features, constructed masks),
the real open_clip and DINO loaders on tiny random models, the node, and the `eval` command."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from unconfused.engine import host
from unconfused.engine.evaluation import metrics as M
from unconfused.engine.errors import UnconfusedError

RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)


def solid(color, size=16):
    return torch.tensor(color).view(1, 1, 3).expand(size, size, 3).clone()


def halves(left, right, size=16):
    img = solid(right, size)
    img[:, : size // 2] = torch.tensor(left)
    return img


class ColourFeatures:
    """Injected features: an image's feature is its mean colour (unit norm); a text's is looked up."""

    name = "colour"

    def __init__(self, texts: dict[str, tuple] | None = None):
        self.texts = texts or {}
        self.calls = 0

    def image_features(self, images):
        self.calls += 1
        if not images:
            return torch.zeros(0, 3)
        return F.normalize(torch.stack([im.reshape(-1, 3).mean(0) for im in images]), dim=-1)

    def text_features(self, texts):
        return F.normalize(torch.tensor([self.texts.get(t, (1.0, 1.0, 1.0)) for t in texts]), dim=-1)


def test_eval_prompt_replaces_or_removes_tokens():
    words = {"<alice>": "woman", "<rex>": "dog"}
    assert M.eval_prompt("a photo of <alice> woman and <rex> on a beach", words) == "a photo of woman and dog on a beach"
    assert M.eval_prompt("<alice>, hugging <rex> dog.", words) == "woman, hugging dog."
    assert M.eval_prompt("a photo of <rex> dog", words, "remove") == "a photo of dog"
    assert M.eval_prompt("<alice>'s hat", words) == "woman's hat"
    assert M.tokens_in("<alice>'s hat next to <rex>", ["<rex>", "<alice>", "<bob>"]) == ["<rex>", "<alice>"]
    assert M.tokens_in("he asks", ["sks"]) == []
    with pytest.raises(UnconfusedError, match="text_mode"):
        M.eval_prompt("x", words, "drop")


def test_text_alignment_conventions_and_pairwise_mean():
    img = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 1.0, 0], [0, -1.0, 0]]), dim=-1)
    cos = M.text_alignment(img, txt, "cosine")
    assert torch.allclose(cos, torch.tensor([1 / math.sqrt(2), -1.0]))
    assert torch.allclose(M.text_alignment(img, txt, "clipscore"), torch.tensor([2.5 / math.sqrt(2), 0.0]))
    assert M.pairwise_mean(img, img) == pytest.approx(0.5)  # (1 + 0 + 0 + 1) / 4
    assert M.pairwise_mean(img, torch.zeros(0, 3)) is None
    assert M.diversity(img) == pytest.approx(1.0) and M.diversity(img[:1]) is None


def test_subject_and_non_subject_segments():
    img = solid(BLUE, 20)
    img[5:10, 4:14] = torch.tensor(RED)
    mask = torch.zeros(20, 20)
    mask[5:10, 4:14] = 1
    seg = M.subject_segment(img, mask)
    assert seg.shape == (5, 10, 3) and torch.equal(seg, solid(RED, 10)[:5])
    rest = M.non_subject_segment(img, mask)
    assert torch.all(rest[5:10, 4:14] == M.FILL) and torch.equal(rest[:5], img[:5])
    assert M.subject_segment(img, torch.zeros(20, 20)) is None


def test_mask_iou_known_answers_and_errors():
    a = torch.zeros(2, 8, 8)
    b = torch.zeros(2, 8, 8)
    a[0, :4] = 1  # 32 px
    b[0, 2:6] = 1  # 32 px, 16 shared -> 16 / 48
    a[1, :, :4] = 1
    b[1, :, :4] = 1
    assert M.mask_iou(a, b) == pytest.approx([1 / 3, 1.0])
    assert M.mask_iou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)) == [1.0]  # both empty: they agree
    big = F.interpolate(b[None], size=(16, 16), mode="nearest")[0]
    assert M.mask_iou(a, big) == pytest.approx([1 / 3, 1.0])  # same aspect: resized
    assert M.mask_iou(a[:1], b) == pytest.approx([1 / 3, 1 / 3])  # one mask against each (rows vs columns)
    with pytest.raises(UnconfusedError, match="aspect"):
        M.mask_iou(a, torch.zeros(2, 8, 16))
    with pytest.raises(UnconfusedError, match="3 masks against 2"):
        M.mask_iou(torch.zeros(3, 8, 8), b)
    with pytest.raises(UnconfusedError, match="empty"):
        M.mask_iou(torch.zeros(0, 8, 8), b)


def refs():
    return [M.Reference("<a>", "ball", [solid(RED)] * 2), M.Reference("<b>", "box", [solid(GREEN)]),
            M.Reference("<c>", "cup", [solid(BLUE)])]


def test_identical_images_give_clip_i_one_and_text_alignment_prefers_own_caption():
    feats = ColourFeatures({"a photo of ball": RED, "a photo of box": GREEN})
    report = M.evaluate([solid(RED), solid(GREEN)], ["a photo of <a>", "a photo of <b> box"], refs(), feats)
    assert report.value("clip_i", "<a>") == pytest.approx(1.0)
    assert report.value("clip_i_single", "<b>") == pytest.approx(1.0)
    assert report.value("clip_t") == pytest.approx(1.0)  # each image with its own caption
    assert [r["scored_prompt"] for r in report.per_image] == ["a photo of ball", "a photo of box"]
    swapped = M.evaluate([solid(RED), solid(GREEN)], ["a photo of <b>", "a photo of <a>"], refs(), feats)
    assert swapped.value("clip_t") == pytest.approx(0.0) and swapped.value("clip_t") < report.value("clip_t")
    assert report.value("clip_i", "<c>") is None and any("<c>" in n for n in report.notes)
    assert report.settings["convention"] == "cosine" and "plain cosine" in report.table()


def test_sid_subject_alignment_and_non_subject_disentanglement():
    photo = solid(BLUE, 20)  # a red subject on a blue background
    photo[4:16, 4:16] = torch.tensor(RED)
    mask = torch.zeros(20, 20)
    mask[4:16, 4:16] = 1
    ref = [M.Reference("<a>", "ball", [photo], [mask])]
    feats = ColourFeatures()
    clean = M.evaluate([solid(RED)], ["<a>"], ref, feats)  # the subject alone: no background leaked
    leaked = M.evaluate([photo], ["<a>"], ref, feats)  # the reference's background came along
    assert clean.value("subject_alignment", "<a>") == pytest.approx(1.0)
    # non-subject segment = blue + grey; a red image shares nothing blue with it
    expect = 1 - float(F.normalize(torch.tensor([1.0, 0, 0]), dim=0) @ F.normalize(
        M.non_subject_segment(photo, mask).reshape(-1, 3).mean(0), dim=0))
    assert clean.value("non_subject_disentanglement", "<a>") == pytest.approx(expect)
    assert leaked.value("non_subject_disentanglement", "<a>") < clean.value("non_subject_disentanglement", "<a>")
    assert leaked.value("subject_alignment", "<a>") < clean.value("subject_alignment", "<a>")
    nomask = M.evaluate([solid(RED)], ["<a>"], [M.Reference("<a>", "ball", [photo])], feats)
    assert nomask.value("subject_alignment", "<a>") is None and any("no masks" in n for n in nomask.notes)


def test_attendance_and_confusion_matrix_of_a_constructed_case():
    # <a> with <b>: both drawn (red | green); <a> with <c>: <c> missing, two <a>s (red | red)
    images = [halves(RED, GREEN), halves(RED, RED)]
    prompts = ["<a> and <b>", "<a> and <c>"]
    left, right = torch.zeros(16, 16), torch.zeros(16, 16)
    left[:, :8], right[:, 8:] = 1, 1
    regions = [[left, right, None], [left, None, right]]
    report = M.evaluate(images, prompts, refs(), ColourFeatures(), region_masks=regions)
    # the confusion matrix: row = concept meant, column = best-matching references
    assert report.confusion.tolist() == [[2, 0, 0], [0, 1, 0], [1, 0, 0]]
    assert report.value("region_accuracy") == pytest.approx(3 / 4)
    # attendance of <c> beside <a>: an all-red image against blue references
    red_green = float(F.normalize(torch.tensor([0.5, 0.5, 0]), dim=0)[0])
    assert report.attendance[0, 1] == pytest.approx(red_green) and report.attendance[0, 2] == pytest.approx(1.0)
    assert report.attendance[2, 0] == pytest.approx(0.0) and report.attendance[1, 0] == pytest.approx(red_green)
    assert math.isnan(report.attendance[1, 2]) and math.isnan(report.attendance[0, 0])
    assert report.value("attendance", "<a>") == pytest.approx((red_green + 1) / 2)
    assert report.value("attendance", "<c>") == pytest.approx(0.0)
    assert report.value("clip_i_multi", "<a>") == pytest.approx((red_green + 1) / 2)
    pics = report.pictures()
    assert set(pics) == {"confusion", "attendance"} and pics["confusion"].size[0] > 100


def test_bad_inputs_are_named():
    feats = ColourFeatures()
    with pytest.raises(UnconfusedError, match="no generated images"):
        M.evaluate([], [], refs(), feats)
    with pytest.raises(UnconfusedError, match="2 prompts for 1 images"):
        M.evaluate([solid(RED)], ["x", "y"], refs(), feats)
    with pytest.raises(UnconfusedError, match="image 1 has no prompt"):
        M.evaluate([solid(RED)] * 2, ["x", " "], refs(), feats)
    bad = [M.Reference("<a>", "ball", [solid(RED)], [torch.zeros(8, 8)])]
    with pytest.raises(UnconfusedError, match="mask 0 of <a> is 8x8 but its image is 16x16"):
        M.evaluate([solid(RED)], ["<a>"], bad, feats)
    with pytest.raises(UnconfusedError, match="2 masks for 1 images"):
        M.evaluate([solid(RED)], ["<a>"], [M.Reference("<a>", "ball", [solid(RED)], [torch.zeros(16, 16)] * 2)], feats)
    with pytest.raises(UnconfusedError, match="region mask 0 of image 0 is 8x8"):
        M.evaluate([solid(RED)], ["<a>"], refs(), feats, region_masks=[[torch.ones(8, 8), None, None]])
    with pytest.raises(UnconfusedError, match="convention"):
        M.evaluate([solid(RED)], ["<a>"], refs(), feats, settings=M.EvalSettings(convention="x"))
    assert M.prompts_for("one\n\n", 3) == ["one"] * 3
    assert M.prompts_for("a\nb", 2) == ["a", "b"]
    with pytest.raises(UnconfusedError, match="3 prompt lines for 2 images"):
        M.prompts_for("a\nb\nc", 2)
    with pytest.raises(UnconfusedError, match="no prompt"):
        M.prompts_for("  \n", 2)


def test_report_files_are_complete_and_numbered(tmp_path):
    report = M.evaluate([halves(RED, GREEN)] * 2, ["<a> and <b>"] * 2, refs(), ColourFeatures())
    first = M.report_folder(tmp_path, "my run")
    files = report.write(first)
    assert first.name == "my run_00001" and M.report_folder(tmp_path, "my run").name == "my run_00002"
    data = json.loads(files["json"].read_text())
    assert data["settings"]["convention"] == "cosine" and data["attendance"][0][1] is not None
    lines = files["csv"].read_text().splitlines()
    assert lines[0] == "metric,concept,value,n,model,note" and len(lines) == len(report.rows) + 1
    assert files["attendance"].is_file() and "confusion" not in files  # no region masks given
    assert "diversity" in {r["metric"] for r in report.rows}  # two images of one prompt
    assert not [p for p in first.iterdir() if p.name.startswith(".")]  # no temp files left
    with pytest.raises(UnconfusedError, match="file name"):
        M.report_folder(tmp_path, "..")


# ------------------------------------------------------------------ real models (tiny, random)
@pytest.fixture(scope="module")
def demo_clip(tmp_path_factory):
    from unconfused.engine.vision.clip_zero_shot import load_clip
    from unconfused.engine.models.demo import write_demo_clip

    return load_clip(write_demo_clip(tmp_path_factory.mktemp("clip")), device="cpu")


def test_open_clip_scorer_features_identical_images_score_one(demo_clip):
    from unconfused.engine.data.synthetic import synthetic_photos

    photos = synthetic_photos(0, 2, 64)
    f = demo_clip.image_features(photos)
    assert f.shape[0] == 2 and torch.allclose(f.norm(dim=-1), torch.ones(2), atol=1e-5)
    report = M.evaluate(photos[:1], ["a photo of <a>"], [M.Reference("<a>", "ball", photos[:1])], demo_clip)
    assert report.value("clip_i", "<a>") == pytest.approx(1.0, abs=1e-5)
    t = demo_clip.text_features(["a photo of ball"])
    assert report.value("clip_t") == pytest.approx(float(f[0] @ t[0]), abs=1e-5)
    assert report.settings["clip"] == demo_clip.name


def write_tiny_dino(folder, model_type="vit"):
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    if model_type == "vit":
        ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(folder)
    else:
        BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(folder)
    return folder


def test_dino_loader_features_and_messages(tmp_path):
    from unconfused.engine.vision import dino as D
    from unconfused.engine.data.synthetic import synthetic_photos

    host.configure(models_dir=tmp_path / "models", output_dir=tmp_path / "out", temp_dir=tmp_path / "temp")
    try:
        with pytest.raises(UnconfusedError, match="models.dino"):
            D.load_dino_by_name("")
        write_tiny_dino(tmp_path / "models" / "dino" / "tiny")
        write_tiny_dino(tmp_path / "models" / "dino" / "bert", "bert")
        assert D.list_dino_models() == ["bert", "tiny"]
        with pytest.raises(UnconfusedError, match="'bert' model, not DINO"):
            D.load_dino_by_name("bert")
        dino = D.load_dino_by_name("tiny", device="cpu")
        photos = synthetic_photos(1, 3, 48)
        f = dino.image_features(photos)
        assert f.shape == (3, 32) and torch.allclose(f.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert torch.allclose(dino.image_features(photos[:1]), f[:1], atol=1e-5)
        report = M.evaluate(photos[:1], ["<a>"], [M.Reference("<a>", "ball", photos[:1])], ColourFeatures(), dino=dino)
        assert report.value("dino", "<a>") == pytest.approx(1.0, abs=1e-5)
        (tmp_path / "models" / "dino" / "tiny" / "model.safetensors").write_bytes(b"broken")
        with pytest.raises(UnconfusedError, match="could not be loaded"):
            D.load_dino_by_name("tiny")
    finally:
        host.reset_standalone()


# ------------------------------------------------------------------ the nodes
def test_evaluate_node_reads_sampler_masks_in_model_order(tmp_path):
    from unconfused.engine.data.concepts import Concept, ConceptSet
    from unconfused.nodes.evaluate import UnconfusedEvaluate, UnconfusedMaskIoU

    host.configure(models_dir=tmp_path / "models", output_dir=tmp_path / "out", temp_dir=tmp_path / "temp")
    try:
        cs = ConceptSet([Concept("<a>", "ball", [solid(RED)]), Concept("<b>", "box", [solid(GREEN)])])
        images = torch.stack([halves(RED, GREEN), halves(GREEN, RED)])
        left, right = torch.zeros(16, 16), torch.zeros(16, 16)
        left[:, :8], right[:, 8:] = 1, 1

        class Bundle:  # the sampler's model: its token order is <b>, <a>
            added_tokens = ["<b>", "<a>"]

        masks = torch.stack([right, left, right, left])  # image-major, in the model's order
        node = UnconfusedEvaluate()
        evaluate = getattr(UnconfusedEvaluate.evaluate, "__wrapped__", UnconfusedEvaluate.evaluate)  # injected
        out = evaluate(node, images, "a photo of <a> and <b>", cs, ColourFeatures(), region_masks=masks, model=Bundle(),
                            name="node")
        table, confusion, attendance = out["result"]
        assert "region_accuracy" in table and "2/4 regions matched" in table and "saved:" in table
        assert confusion.shape[0] == 1 and confusion.shape[-1] == 3 and confusion.shape[1] > 64
        saved = list((tmp_path / "out" / "unconfused" / "eval").iterdir())
        assert [p.name for p in saved] == ["node_00001"] and (saved[0] / "confusion.png").is_file()
        with pytest.raises(UnconfusedError, match="3 region masks for 2 images and 2 concept tokens"):
            evaluate(node, images, "<a> and <b>", cs, ColourFeatures(), region_masks=masks[:3], save=False)
        with pytest.raises(UnconfusedError, match="input 'clip_model': expected a CLIP model"):
            node.evaluate(images=images, prompts="<a>", concepts=cs, clip_model=ColourFeatures())  # ComfyUI's call
        iou = UnconfusedMaskIoU().measure(torch.stack([left, left]), torch.stack([left, right]))
        assert iou["result"][0] == pytest.approx(0.5) and "mask 1: 0.0000" in iou["result"][1]
    finally:
        host.reset_standalone()


# ------------------------------------------------------------------ the command
def test_eval_command_on_folders(tmp_path, demo_clip, capsys):
    from unconfused.engine.data.concepts import tensor_to_pil
    from unconfused.engine.models.demo import write_demo_clip
    from unconfused.app.cli import main
    from unconfused.engine.data.synthetic import synthetic_photos

    clip_path = write_demo_clip(tmp_path / "models" / "clip_vision")
    photos = synthetic_photos(0, 2, 64)
    gen, ref = tmp_path / "generated", tmp_path / "refs" / "a"
    (ref / "masks").mkdir(parents=True)
    gen.mkdir()
    for i, img in enumerate(photos):
        tensor_to_pil(img).save(gen / f"g{i}.png")
        tensor_to_pil(img).save(ref / f"r{i}.png")
        tensor_to_pil(torch.ones(64, 64)).save(ref / "masks" / f"r{i}.png")
    (gen / "g0.txt").write_text("a photo of <a> ball\n")
    for i in range(2):
        (tmp_path / "em" / "x").mkdir(parents=True, exist_ok=True)
    tensor_to_pil(torch.ones(8, 8)).save(tmp_path / "em" / "x" / "m.png")
    (tmp_path / "gt").mkdir()
    tensor_to_pil(torch.ones(8, 8)).save(tmp_path / "gt" / "m.png")
    cfg = tmp_path / "eval.toml"
    cfg.write_text(f'images = "generated"\nconcepts = ["refs/a:<a>:ball"]\nclip = "{clip_path.name}"\n'
                   'masks_a = "em/x"\nmasks_b = "gt"\noutput = "report"\n')
    assert main(["eval", "--config", str(cfg)]) == 2  # g1 has no prompt and there is no fallback
    assert "1 image(s) in" in capsys.readouterr().err and not (tmp_path / "report").exists()
    cfg.write_text(cfg.read_text() + 'prompt = "a photo of <a>"\n')
    assert main(["eval", "--config", str(cfg), "--set", "convention=clipscore"]) == 0
    printed = capsys.readouterr().out
    assert "CLIPScore" in printed and "subject_alignment" in printed and "mask_iou" in printed
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["settings"]["convention"] == "clipscore"
    assert [r["file"] for r in data["per_image"]] == ["g0", "g1"]
    assert [r["prompt"] for r in data["per_image"]] == ["a photo of <a> ball", "a photo of <a>"]
    assert {r["metric"] for r in data["rows"]} >= {"clip_t", "clip_i", "subject_alignment", "mask_iou"}
    assert next(r["value"] for r in data["rows"] if r["metric"] == "mask_iou" and r["concept"] == "all") == 1.0
    (tmp_path / "empty").mkdir()
    cfg.write_text('images = "empty"\nconcepts = ["refs/a:<a>:ball"]\nclip = "x.safetensors"\n')
    assert main(["eval", "--config", str(cfg)]) == 2
    assert "holds no images" in capsys.readouterr().err
    cfg.write_text('output = "r"\n')
    assert main(["eval", "--config", str(cfg)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    host.reset_standalone()


def test_a_metric_is_one_declared_function_that_evaluate_and_the_docs_pick_up():
    """The registry is what evaluate runs: a metric registered with @metric adds its rows (and, per
    concept, their mean) with no other change, and its declaration reaches the generated docs page."""
    feats = ColourFeatures()

    @M.metric("redness", "Redness", "mean red channel of the pictures naming a concept", "this test",
              per_concept=True)
    def _redness(x, report):
        for k, token in enumerate(x.tokens):
            idx = x.naming(k)
            if idx:
                report.add("redness", sum(float(x.images[i][..., 0].mean()) for i in idx) / len(idx), concept=token,
                           n=len(idx))

    try:
        report = M.evaluate([solid(RED), solid(GREEN)], ["<a>", "<b>"], refs()[:2], feats)
        assert report.value("redness", "<a>") == pytest.approx(1.0)
        assert report.value("redness", "<b>") == pytest.approx(0.0)
        assert report.value("redness") == pytest.approx(0.5)  # the mean over concepts, from per_concept
        assert "| **Redness**: `redness` |" in M.metrics_page()
    finally:
        del M.METRICS["redness"]
    assert M.evaluate([solid(RED)], ["<a>"], refs()[:1], feats).value("redness", "<a>") is None


def test_metrics_page_is_generated_from_the_declarations():
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gen_docs", repo / "scripts" / "gen_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen._write_or_check(gen.METRICS_MD, M.metrics_page(), check=True) == 0, \
        "run: python scripts/gen_docs.py metrics"
    for name in ("clip_t", "clip_i", "subject_alignment", "non_subject_disentanglement", "dino", "attendance",
                 "diversity", "region_accuracy"):
        assert f"`{name}`" in M.metrics_page()
