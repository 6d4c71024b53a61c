"""Command line: `python -m unconfused <command> ...` (the trainers add their commands here).

Heavy libraries (torch, diffusers, ...) are imported only when a command runs, so `--help`
answers at once. Ctrl-C and SIGTERM (what `timeout`, `docker stop` and job schedulers send)
ask the job to stop at its next check: a training run writes a checkpoint of its last
finished step, and rerunning the command resumes there. A second signal stops at once, with a
line, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path



def _concept_spec(text: str):
    from ..engine.data.concepts import parse_concept_spec
    from ..engine.errors import UnconfusedError
    from .smoke import ConceptSpec

    try:
        return ConceptSpec(*parse_concept_spec(text, input="--concept"))
    except UnconfusedError:
        raise argparse.ArgumentTypeError("use FOLDER:TOKEN:CLASS, e.g. photos/alice:<alice>:woman") from None


def _resolution(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of pixels, e.g. 64") from None
    if value < 64 or value % 64:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 64 (at least 64), e.g. 64 or 512")
    return value


def _count(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {least} or more (got {value})")
        return value
    return parse


def _smoke(args) -> int:
    from ..engine import host
    from . import smoke

    specs = args.concept or [smoke.ConceptSpec(None, "<red-thing>", "ball"),
                             smoke.ConceptSpec(None, "<blue-thing>", "box")]
    with host.running_node(name="smoke"):  # errors deep in the engine name the command
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
    from ..engine import host
    from . import flow
    from .jobs import demo_settings

    paths = {k: Path(getattr(args, k)) for k in ("workdir", "ckpt", "clip", "sam") if getattr(args, k)}
    flags = {**paths, "concepts": args.concept, "preset": args.preset, "resolution": args.resolution,
             "pairs": args.pairs, "region_pairs": args.region_pairs, "bank_images": args.bank_images,
             "clif_steps": args.clif_steps, "lora_steps": args.lora_steps, "sample_steps": args.sample_steps,
             "prompt": args.prompt, "name": args.name, "resume": args.resume, "seed": args.seed}
    s = demo_settings(args.config, args.set, flags)
    with host.running_node(name=flow.NODE):  # errors deep in the engine name the command
        report = flow.run(s)
    print(flow.format_report(report))
    print(f"report written to {Path(s.workdir) / 'report.json'}")
    return 0


def _eval(args) -> int:
    from .jobs import run_eval

    report = run_eval(args.config, args.set)
    print(report["table"])
    print(f"report written to {report['output']}")
    return 0


def _plan(args) -> int:
    from .jobs import plan_job

    print(plan_job(args.config, args.set, trainer=args.trainer, family=args.family).text())
    return 0


def _toyworld(args) -> int:
    from ..trainers import toyworld

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
    s.add_argument("--resolution", type=_resolution, default=64, help="training resolution in pixels, a multiple "
                                                                        "of 64 (default: %(default)s)")
    s.set_defaults(func=_smoke)
    s = sub.add_parser("demo", help="the whole CLIF flow (cut-outs, augmentations, CLIF, LoRA, sampling with the "
                                    "attention debugger) on built-in defaults or your files; rerun to resume")
    s.add_argument("--config", help="a job file (TOML/JSON) with the same settings: model, clip, sam, concepts, "
                                    "workdir, preset, [settings] (the options below by their names, e.g. clif_steps, "
                                    "and [settings.clif] / .lora / .augment / .bank); options given here win")
    s.add_argument("--workdir", help="where models, outputs, pictures and report.json go (default: unconfused-demo; "
                                     "with --config: the job file's folder)")
    s.add_argument("--ckpt", help="an SD 1.x/2.x checkpoint or diffusers folder (default: the toy world's model)")
    s.add_argument("--clip", help="an open_clip checkpoint with both towers matching the text encoder (ViT-L/14 for "
                                  "SD1, ViT-H/14 for SD2; default: the toy world's, or a tiny one with --ckpt)")
    s.add_argument("--sam", help="a SAM checkpoint (sam_vit_b/l/h): cut-outs of your photos and Region (R-Aug) pairs")
    s.add_argument("--concept", action="append", type=_concept_spec,
                   help="FOLDER:TOKEN:CLASS, repeatable (default: the toy world's two concepts)")
    s.add_argument("--preset", choices=["quick", "paper", "custom"],
                   help="the trainers' preset (docs/presets.md) and the demo's counts; default: quick with --ckpt, "
                        "else the fast built-in run")
    s.add_argument("--resolution", type=_resolution,
                   help="training resolution in pixels, a multiple of 64 (default: 64 for the built-in run; "
                        "with a preset the model's native size: 512 SD1, 768 SD2-v)")
    s.add_argument("--pairs", type=_count(0), help="Global (G-Aug) pairs (quick 2000, paper 40000, built-in 48)")
    s.add_argument("--region-pairs", type=_count(0), help="Region (R-Aug) pairs, made only with --sam (quick 500, "
                                                          "paper 10000)")
    s.add_argument("--bank-images", type=_count(1), help="images per common concept, drawn by your model and cached "
                                                         "(quick 4, paper 20; the built-in run uses the toy world's objects)")
    s.add_argument("--clif-steps", type=_count(0), help="CLIF text-encoder steps (default: the preset's; built-in 60)")
    s.add_argument("--lora-steps", type=_count(1), help="LoRA + token steps (default: the preset's; built-in 150)")
    s.add_argument("--sample-steps", type=_count(1), help="sampling steps per picture (default: 20)")
    s.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="a stage's own setting: clif.*, lora.* (the trainers' settings), augment.* (the Augment "
                        "node's), bank.* (steps, cfg, ...), e.g. --set clif.batch_size=32 (repeatable)")
    s.add_argument("--prompt", help="default: a photo of <first token> and <second token> (built-in: a photo of "
                                    "<a-ball> ball and <b-ball> ball on snow)")
    s.add_argument("--name", help="run name: the CLIF and LoRA runs are <name>-clif and <name>-lora "
                                  "and the exports carry it; another name starts a separate run in "
                                  "the same workdir (default: demo)")
    s.add_argument("--resume", choices=["auto", "restart"],
                   help="auto: continue where the last run of this name stopped, finished stages return at once; "
                        "restart: train every stage again from step 0 (default: auto)")
    s.add_argument("--seed", type=int, help="seed of every stage (default: 0)")
    s.set_defaults(func=_demo)
    s = sub.add_parser("toyworld", help="train the toy world's miniature SD 1.x model from scratch on a CPU "
                                        "(resumable: rerun the same command)")
    s.add_argument("action", choices=["train"])
    s.add_argument("--workdir", default="toyworld-run", help="checkpoints of the stages (resume from here)")
    s.add_argument("--out", help="where the model goes (default: the pack's engine/evaluation/toyworld_weights)")
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
    from . import captions_check  # light: its heavy imports are inside run()

    captions_check.add_parser(sub)
    s = sub.add_parser("plan", help="GPU memory plan of a lora/clif/em job file, made on the CPU (one training step "
                                    "with fake tensors): the estimate and the settings that fit 6/8/12/16/24 GB")
    s.add_argument("--config", required=True, help="the job file of the lora, clif or em command")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    s.add_argument("--trainer", choices=["lora", "clif", "em"], help="default: from the job's keys")
    s.add_argument("--family", choices=["sd1", "sd2", "sdxl", "demo"], help="default: read from the model file")
    s.set_defaults(func=_plan)
    return p


class _Stop:
    """The signal handler: the first Ctrl-C or SIGTERM asks the job to stop at its next check
    (a checkpoint is written); the second stops at once (KeyboardInterrupt, caught in main)."""

    def __init__(self):
        self.asked = None

    def __call__(self, signum, frame):
        import signal

        if self.asked is None:
            from ..engine import host

            self.asked = signal.Signals(signum).name
            print(f"\n{self.asked}: stopping at the next step (a checkpoint is written; rerun the command to "
                  "resume); send it again to stop at once", file=sys.stderr)
            host.request_cancel()
        else:
            raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import signal

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from ..engine.threads import set_thread_environment

    set_thread_environment()  # before torch loads: OpenMP's default then holds for every thread
    from ..engine import host
    from ..engine.errors import Cancelled, UnconfusedError

    host.apply_thread_defaults()
    stop = _Stop()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread (main() called from a thread): keep the defaults
            pass
    try:
        return args.func(args)
    except Cancelled:
        print(f"cancelled ({stop.asked or 'by request'}); rerun the command to resume", file=sys.stderr)
        return 130 if stop.asked != "SIGTERM" else 143
    except KeyboardInterrupt:
        print("stopped; rerun the command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except UnconfusedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        host.clear_cancel()


if __name__ == "__main__":
    sys.exit(main())
