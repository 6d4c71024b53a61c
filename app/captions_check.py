"""`python -m unconfused captions check`: the SID checker on captions written elsewhere.

    python -m unconfused captions check --token "<sks>" --class dog "A <sks> dog on a red rug." ...
    python -m unconfused captions check --token sks --class dog --folder train/10_sks_dog

The folder form reads kohya-style sidecars: for every image (png, jpg, jpeg, webp, bmp; subfolders
included) the caption file next to it with the same name and `--caption-extension` (.txt). It
prints one verdict per caption (ok / repaired / flagged) with its reason, the caption as the
checker would train it, and a summary. Nothing is written.

Exit code: 0 when no caption is flagged (repaired ones count as usable unless --strict), 1 when at
least one is flagged (or, with --strict, repaired), 2 on bad input (no captions, missing folder).
"""

from __future__ import annotations

import argparse
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("captions", help="check captions written elsewhere against the SID rules")
    sub = p.add_subparsers(dest="captions_command", required=True)
    c = sub.add_parser("check", help="one verdict per caption (ok / repaired / flagged) with its reason; exit "
                                     "code 1 when any caption is flagged",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("captions", nargs="*", help="captions to check (quote each one)")
    c.add_argument("--token", required=True, help='the concept token as written in the captions, e.g. "<sks>"')
    c.add_argument("--class", dest="class_word", required=True, help="the class word, e.g. dog")
    c.add_argument("--folder", action="append", default=[], metavar="DIR",
                   help="a folder of images with caption sidecars (kohya style), repeatable")
    c.add_argument("--caption-extension", default=".txt", help="sidecar extension (default .txt)")
    c.add_argument("--mode", choices=["subject", "style"], default="subject")
    c.add_argument("--pose", action="store_true", help="allow the subject's pose and expression (paper D.2)")
    c.add_argument("--no-detail-rule", action="store_true",
                   help="do not flag captions without a specific detail of other things (Case 1/2)")
    c.add_argument("--strict", action="store_true", help="repaired captions also make the exit code 1")
    c.set_defaults(func=run)


def _sidecars(folder: Path, ext: str) -> list[tuple[str, str | None]]:
    from ..engine.errors import UnconfusedError

    if not folder.is_dir():
        raise UnconfusedError(f"{folder} is not a folder; give the folder that holds the images and their "
                              f"{ext} captions", input="--folder")
    ext = ext if ext.startswith(".") else "." + ext
    out = []
    for img in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        side = img.with_suffix(ext)
        out.append((str(img), side.read_text(encoding="utf-8", errors="replace").strip() if side.is_file()
                    else None))
    if not out:
        raise UnconfusedError(f"no images in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})", input="--folder")
    return out


def run(args) -> int:
    from ..engine import host

    with host.running_node(name="captions check"):  # the command names itself in every message
        return _run(args)


def _run(args) -> int:
    from ..engine.captions import sid
    from ..engine.errors import UnconfusedError

    items: list[tuple[str, str | None]] = [(f"argument {i + 1}", c) for i, c in enumerate(args.captions)]
    for folder in args.folder:
        items += _sidecars(Path(folder), args.caption_extension)
    if not items:
        raise UnconfusedError("no captions: give captions as arguments or --folder DIR with caption sidecars", input="captions")
    counts = {"ok": 0, "repaired": 0, "flagged": 0}
    failed = 0
    for i, (source, text) in enumerate(items):
        if text is None:
            status, reason, caption = "flagged", f"no caption file ({args.caption_extension}) next to the image", ""
        else:
            c = sid.check_caption(text, args.token, args.class_word, mode=args.mode, allow_pose=args.pose,
                                  index=i, require_detail=not args.no_detail_rule)
            status, caption = c.status, c.caption
            reason = "; ".join(c.problems or c.changes or ["a SID caption"])
            if c.warnings:
                reason += " (note: " + "; ".join(c.warnings) + ")"
        counts[status] += 1
        failed += status == "flagged" or (args.strict and status == "repaired")
        print(f"{status.upper() if status == 'flagged' else status:9s} {source}: {reason}")
        print(f"          {caption}")
    print(f"{len(items)} captions: {counts['ok']} ok, {counts['repaired']} repaired, {counts['flagged']} flagged")
    return 1 if failed else 0
