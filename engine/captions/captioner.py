"""SID captions for one concept (paper Case 3): ask a vision-language model (or take the user's lines,
or the template baseline), then check and repair every caption with engine/captions/sid.py's rules."""

from __future__ import annotations

from .. import host
from . import sid, vlm
from ..data.concepts import tensor_to_pil
from ..errors import UnconfusedError

BACKENDS = ["openai-compatible", "local transformers", "manual", "template (Case 1 baseline)"]
NO_LOCAL = "(none)"  # always offered, so a shared workflow validates on machines with and without models


def local_choices() -> list[str]:
    try:
        names = vlm.list_local_models()
    except Exception:
        names = []
    return [NO_LOCAL] + names


def caption_concept(node, concept, manual_lines, *, backend, mode, describe_pose, instruction, base_url, model,
                    api_key_env, local_model, device, precision, on_flagged, template, timeout, retries,
                    concurrency, max_tokens, temperature, max_image_side):
    """Captions for one concept: (concept with captions, captions, checks, PIL photos)."""
    n = len(concept.images)
    if backend not in BACKENDS:
        raise UnconfusedError(f"unknown backend '{backend}'; use one of {BACKENDS}", input="backend")
    fallback = sid.STYLE_BASELINE_TEMPLATE if mode == "style" and template == sid.BASELINE_TEMPLATE else template
    sid.template_caption(concept.token, concept.class_word, fallback)  # check the template early
    text = sid.build_instruction(concept.token, concept.class_word, mode=mode, describe_pose=describe_pose,
                                 text=instruction)
    pils = [tensor_to_pil(img) for img in concept.images]
    if backend == "template (Case 1 baseline)":
        raw = [sid.template_caption(concept.token, concept.class_word, fallback)] * n
    elif backend == "manual":
        lines = list(manual_lines)
        if not lines:
            if not concept.captions:
                raise UnconfusedError(f"no captions for {concept.token}: write one caption per photo (one per "
                                      "line) into manual_captions, or give a concept that has captions",
                                      input="manual_captions")
            lines = list(concept.captions)
        if len(lines) != n:
            raise UnconfusedError(f"{len(lines)} caption lines for {n} photos of {concept.token}: write one "
                                  "caption per photo, one per line, in the photos' order",
                                  input="manual_captions")
        raw = lines
    else:
        bar = host.progress(n, f"SID captions for {concept.token}")
        try:
            if backend == "openai-compatible":
                client = vlm.OpenAIBackend(base_url, model, api_key_env, timeout=float(timeout),
                                           retries=int(retries), concurrency=int(concurrency),
                                           max_tokens=int(max_tokens), temperature=float(temperature),
                                           max_image_side=int(max_image_side))
            else:
                if local_model == NO_LOCAL or not local_model:
                    found = [x for x in local_choices() if x != NO_LOCAL]
                    raise UnconfusedError(("pick one of " + ", ".join(found)) if found else
                                          "no vision-language model folder was found: put a transformers model "
                                          "folder (config.json, weights, processor files) into models/LLM/<name>, "
                                          "refresh the page (R) and pick it", input="local_model")
                client = vlm.LocalBackend(local_model, device=device, precision=precision,
                                          max_new_tokens=int(max_tokens))
            raw = client.caption(pils, [text] * n, on_done=lambda i: bar.update(1))
        finally:
            bar.close()
    checks = sid.check_captions(raw, concept.token, concept.class_word, mode=mode, allow_pose=describe_pose,
                                require_detail=backend != "template (Case 1 baseline)")  # Case 1 on purpose
    captions = sid.resolve_flagged(checks, concept.token, concept.class_word, on_flagged=on_flagged,
                                   template=fallback)
    return concept.with_captions(captions), captions, checks, pils
