"""Command line: `python -m unconfused <command> ...` (the trainers add their commands here)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from ..engine import host
from ..engine.errors import Cancelled, UnconfusedError


def _concept_spec(text: str):
    from .smoke import ConceptSpec

    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("use FOLDER:TOKEN:CLASS, e.g. photos/alice:<alice>:woman")
    return ConceptSpec(Path(parts[0]), parts[1], parts[2])


def _smoke(args) -> int:
    from . import smoke

    specs = args.concept or [smoke.ConceptSpec(None, "<red-thing>", "ball"),
                             smoke.ConceptSpec(None, "<blue-thing>", "box")]
    report = smoke.run(Path(args.workdir), Path(args.ckpt) if args.ckpt else None, specs, args.resolution)
    print(smoke.format_report(report))
    print(f"report written to {Path(args.workdir) / 'report.json'}")
    return 0


def _job(runner_name: str):
    """A config-file command: run the job, print its summary and its numbers as JSON."""
    def run(args) -> int:
        import json

        from . import jobs

        report = getattr(jobs, runner_name)(args.config, args.set)
        print(report.pop("info"))
        print(json.dumps(report, indent=2))
        return 0
    return run


def _demo(args) -> int:
    from . import flow

    s = flow.FlowSettings(workdir=Path(args.workdir), ckpt=Path(args.ckpt) if args.ckpt else None,
                          clip=Path(args.clip) if args.clip else None, sam=Path(args.sam) if args.sam else None,
                          concepts=args.concept or [], resolution=args.resolution, clif_steps=args.clif_steps,
                          lora_steps=args.lora_steps, prompt=args.prompt)
    report = flow.run(s)
    print(flow.format_report(report))
    print(f"report written to {Path(args.workdir) / 'report.json'}")
    return 0


def _eval(args) -> int:
    from .jobs import run_eval

    report = run_eval(args.config, args.set)
    print(report["table"])
    print(f"report written to {report['output']}")
    return 0


def _toyworld(args) -> int:
    from . import toyworld

    return toyworld.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unconfused", description="Unconfused: multi-concept "
                                "personalization without concept confusion (headless commands)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("smoke", help="load a model, define concepts, take one training step (built-in defaults)")
    s.add_argument("--workdir", default="unconfused-run", help="where models, outputs and report.json go")
    s.add_argument("--ckpt", help="an SD 1.x/2.x checkpoint file or diffusers folder (default: the built-in "
                                  "random demo model)")
    s.add_argument("--concept", action="append", type=_concept_spec,
                   help="FOLDER:TOKEN:CLASS, repeatable (default: two built-in synthetic concepts)")
    s.add_argument("--resolution", type=int, default=64)
    s.set_defaults(func=_smoke)
    s = sub.add_parser("demo", help="the whole CLIF flow (cut-outs, augmentations, CLIF, LoRA, sampling with the "
                                    "attention debugger) on built-in defaults or your files; rerun to resume")
    s.add_argument("--workdir", default="unconfused-demo", help="where models, outputs, pictures and report.json go")
    s.add_argument("--ckpt", help="an SD 1.x/2.x checkpoint or diffusers folder (default: the built-in demo model)")
    s.add_argument("--clip", help="an open_clip checkpoint with both towers matching the text encoder (ViT-L/14 for "
                                  "SD1, ViT-H/14 for SD2; default: a tiny built-in one)")
    s.add_argument("--sam", help="a SAM checkpoint (sam_vit_b/l/h): cut-outs of your photos")
    s.add_argument("--concept", action="append", type=_concept_spec,
                   help="FOLDER:TOKEN:CLASS, repeatable (default: two built-in synthetic concepts)")
    s.add_argument("--resolution", type=int, default=64)
    s.add_argument("--clif-steps", type=int, default=30)
    s.add_argument("--lora-steps", type=int, default=40)
    s.add_argument("--prompt", default="", help="default: a photo of <first token> and <second token>")
    s.set_defaults(func=_demo)
    s = sub.add_parser("toyworld", help="train the toy world's miniature SD 1.x model from scratch on a CPU "
                                        "(resumable: rerun the same command)")
    s.add_argument("action", choices=["train"])
    s.add_argument("--workdir", default="toyworld-run", help="checkpoints of the stages (resume from here)")
    s.add_argument("--out", help="where the model goes (default: the pack's engine/toyworld_weights)")
    s.add_argument("--stages", help="comma-separated subset of clip,vae,latents,unet,export")
    s.add_argument("--quick", action="store_true", help="a few steps of each stage (a test run)")
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    s.set_defaults(func=_toyworld)
    for name, runner, about, config, example in (
            ("lora", "run_lora", "train concept tokens + a shared UNet LoRA from a config file (JSON/TOML); rerun the "
             "same command to resume", "model, concepts or concept_set, [settings]", "steps=20"),
            ("clif", "run_clif", "CLIF: contrastive fine-tuning of the text encoder on an augmented dataset, from a "
             "config file (model, dataset, image_tower, [settings]); torchrun for several GPUs; rerun to resume",
             "model, dataset, image_tower, [settings]", "steps=20"),
            ("em", "run_em", "mask EM: learn concept tokens, a LoRA and each concept's mask from images holding "
             "several concepts, no masks given (config: model, images, concepts, [settings]); rerun to resume",
             "model, images, concepts, optional ground_truth, [settings]", "steps=20"),
            ("eval", None, "the papers' metrics (CLIP-T, CLIP-I, DINO, SID subject/non-subject, CLIF attendance and "
             "confusion, mask IoU) on folders of images with prompts; writes report.json + metrics.csv",
             "images (+ .txt prompts), concepts or concept_set, clip, optional dino, region_masks, masks_a + "
             "masks_b, output", "convention=clipscore")):
        s = sub.add_parser(name, help=about)
        s.add_argument("--config", required=True, help="the job: " + config)
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help=f"override a setting, e.g. --set {example} (repeatable)")
        s.set_defaults(func=_job(runner) if runner else _eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    # Ctrl-C asks the job to stop at its next check; a second Ctrl-C kills it.
    signal.signal(signal.SIGINT, lambda *_: (host.request_cancel(), signal.signal(signal.SIGINT,
                                                                                   signal.default_int_handler)))
    try:
        return args.func(args)
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except UnconfusedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
