"""The paper's Figure 3 shape on a case with known masks (issue 17, item 3): the mask EM's estimated
masks get closer to the truth over its rounds - IoU rises, then changes little.

The case needs a model that knows what it is looking at, so it runs on the trained toy model
(engine/evaluation/toyworld.py, docs/toyworld.md: it draws and grounds colours, not shapes; 64 px pictures,
8 x 8 latents):
- two pictures of a red ball and a blue box on snow, and one picture of each alone, with the world's
  exact per-object masks as the truth;
- concepts `<a> ball`, `<b> box`: each token starts from its class word. The toy model's shape words
  do not ground (their cross-attention hardly touches the objects), so the first masks are poor
  (IoU ~0.22) and the tokens must learn their object's colour to find it - the rise the test sees;
- cross-attention of the 8 x 8 level (the 4 x 4 default level of this small UNet is too coarse for
  objects of ~1/4 of the picture: IoU stayed below 0.1 there on pair pictures), Otsu threshold, no
  CRF (at 64 px the image CRF turned the box mask into both objects or nothing on pair pictures: IoU
  flipped between 0.24 and 0.50);
- 60 token-only steps at token_lr 5e-3, masks re-estimated every 10 steps: 7 rounds.

Measured (mean IoU of both tokens vs the truth per round; seeds 0-3; docs/em.md has the table):
first round 0.217-0.235, last round 0.370-0.469, rise 0.146-0.248; the last round-to-round change
0.003-0.076, at most 0.31 of the rise. The margins below sit inside that spread.

The cross-attention term is not what makes the rise: trained with attention_weight 0 the same case
rises as well (last round 0.363-0.435, 0.006-0.036 below the runs with the term in all four seeds:
the paper's direction, too small against the round-to-round wander for an honest margin on IoU;
weight 1.0 stopped the rise). The tokens learn their colours from the masked diffusion loss of the
pictures showing one object alone. What the term does here is measured on the attention itself: the
trained tokens' cross-attention agrees better with the true masks with the term than without, in
every seed (second test). That test fails when the term is not added. The rise test is not meant
to: with the term removed it happens to fail on seed 0 by 0.003 (`<b>` rises 0.047, the per-token
margin is 0.05; the other seeds' runs without the term rise 0.096-0.251 per token), not a margin to
rely on.
"""

from __future__ import annotations

import random

import pytest
import torch

from unconfused.engine.evaluation import toyworld as tw
from unconfused.engine.vision.attention import AttentionCapture, token_position_mask
from unconfused.trainers import em as E

MEASURE = E.attention_loss  # the measure keeps the real loss when a check patches the trainer's away

# the 8 x 8 level of the toy UNet (its default level is 4 x 4)
LAYERS = ",".join(["down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                   "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                   "up_blocks.1.attentions.1.transformer_blocks.0.attn2"])
RED_BALL, BLUE_BOX = ("ball", "red", "plain", "big"), ("box", "blue", "plain", "big")
MIN_RISE = 0.10  # last round - first round of the mean IoU; measured 0.146-0.248 (seed 0: 0.157)
MIN_TOKEN_RISE = 0.05  # each token's own rise; measured 0.082-0.253 (seed 0: 0.082 for <b>)
MAX_LAST_CHANGE = 0.5  # |last - second to last| as a share of the rise; measured 0.02-0.31 (seed 0: 0.02)
MIN_AGREEMENT_GAIN = 0.005  # attention-vs-truth loss, weight 0 minus default; measured 0.011-0.016 (seed 0: 0.013)


def case(seed: int = 0) -> list[E.Scene]:
    """Pair pictures and one picture of each object alone, with the exact masks as ground truth."""
    rng = random.Random(f"fig3:{seed}")
    pics, concepts = [], []
    for _ in range(2):
        pics.append(tw.paint(tw.place(rng, [RED_BALL, BLUE_BOX]), "snow"))
        concepts.append([("<a>", "ball"), ("<b>", "box")])
    rng = random.Random(f"alone:{seed}")
    for spec, concept in ((RED_BALL, ("<a>", "ball")), (BLUE_BOX, ("<b>", "box"))):
        pics.append(tw.paint(tw.place(rng, [spec]), "snow"))
        concepts.append([concept])
    return E.make_scenes([torch.from_numpy(img).float() / 255 for img, _ in pics], concepts,
                         [torch.from_numpy(m).float() for _, masks in pics for m in masks])


def settings(**kw) -> E.EMSettings:
    base = dict(name="fig3", steps=60, tokens_only_steps=60, reestimate_every=10, resolution=64, token_lr=5e-3,
                batch_size=2, flip=False, init_timesteps=16, reestimate_timesteps=16, threshold_mode="otsu",
                crf_at="off", attention_layers=LAYERS, rank=4, alpha=4.0, checkpoint_every=0, export=False,
                resume="restart", seed=0)
    base.update(kw)
    return E.EMSettings(**base)


def curve(res: E.EMResult) -> list[float]:
    return [sum(r.iou.values()) / len(r.iou) for r in res.rounds]


@torch.no_grad()
def agreement(res: E.EMResult, scenes: list[E.Scene], timesteps=(50, 150, 250, 350, 450, 550, 650, 750)) -> float:
    """How far the trained tokens' cross-attention (8 x 8 level) is from the TRUE masks: the
    cross-attention loss itself (each map / its max vs its mask, MSE) over every picture with its own
    prompt, at fixed timesteps and noise. Lower is better."""
    b = res.bundle
    sched = b.noise_scheduler()
    g = torch.Generator().manual_seed(123)
    t = torch.tensor(timesteps)
    losses = []
    for sc in scenes:
        lat = b.vae.encode(sc.image.permute(2, 0, 1)[None] * 2 - 1).latent_dist.mean * b.vae.config.scaling_factor
        noisy = sched.add_noise(lat.expand(len(t), -1, -1, -1), torch.randn(len(t), *lat.shape[1:], generator=g), t)
        prompt = ["a photo of " + " and ".join(sc.tokens)]
        with AttentionCapture(b.unet, LAYERS.split(","), detach=True) as cap:
            cap.watch(token_position_mask(b, prompt, sc.tokens).expand(len(t), -1, -1))
            b.unet(noisy, t, b.text_encoder(b.tokenize(prompt))[0].expand(len(t), -1, -1))
            maps = cap.maps(tuple(lat.shape[-2:]))
        truth = torch.stack([sc.ground_truth[x] for x in sc.tokens])[None].expand(len(t), -1, -1, -1)
        losses.append(float(MEASURE(maps, truth)))
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The case trained with the default attention_weight and with 0 (same seed, same first masks)."""
    assert tw.is_trained(), "the trained toy model is missing from engine/evaluation/toyworld_weights"
    toy = tw.load_toy_bundle()
    root = tmp_path_factory.mktemp("fig3")
    return {w: E.train_em(toy.clone(), case(), settings(attention_weight=w), run_root=root / str(w))
            for w in (settings().attention_weight, 0.0)}


def test_masks_improve_over_rounds_then_flatten(runs):
    """Figure 3: per-round IoU of the estimated masks with the truth rises from the class-word masks,
    and the last round changes it little compared with the rise."""
    res = runs[settings().attention_weight]
    assert [r.step for r in res.rounds] == [0, 10, 20, 30, 40, 50, 60]
    ious = curve(res)
    rise = ious[-1] - ious[0]
    assert ious[0] < 0.3, ious  # the class words alone find the objects poorly (measured 0.217-0.235)
    assert rise >= MIN_RISE, ious
    for t in ("<a>", "<b>"):  # both concepts improve, not one at the other's expense
        assert res.rounds[-1].iou[t] >= res.rounds[0].iou[t] + MIN_TOKEN_RISE, (t, [r.iou for r in res.rounds])
    assert abs(ious[-1] - ious[-2]) <= MAX_LAST_CHANGE * rise, ious


def test_attention_term_pulls_attention_onto_the_true_objects(runs):
    """The ablation on the same case: with the default attention_weight the trained tokens'
    cross-attention agrees better with the true masks than with weight 0 (the masks it is pulled
    onto are the EM's own estimates, IoU ~0.4 with the truth). Measured (all 4 pictures; weight 1e-2
    vs 0): seed 0 0.2018 vs 0.2146, seed 1 0.2039 vs 0.2145, seed 2 0.2221 vs 0.2337, seed 3 0.2059
    vs 0.2223: a paired difference of 0.011-0.016 in every seed (the values themselves vary more
    between seeds). Fails when the term is not added (both runs then train alike: 0.2146 vs 0.2146)."""
    assert settings().attention_weight == 1e-2  # the default is what is tested
    with_term, without = runs[1e-2], runs[0.0]
    assert torch.equal(with_term.rounds[0].masks, without.rounds[0].masks)  # only training differs
    scenes = case()
    a_with, a_without = agreement(with_term, scenes), agreement(without, scenes)
    assert a_with <= a_without - MIN_AGREEMENT_GAIN, (a_with, a_without)
