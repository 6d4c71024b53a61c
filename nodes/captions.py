"""SID captioner node: one selectively informative caption per reference photo of a concept."""

from __future__ import annotations

from dataclasses import replace

from ..engine import host
from ..engine.captions import sid, vlm
from ..engine.captions.captioner import BACKENDS, caption_concept, local_choices as _local_choices
from ..engine.errors import UnconfusedError
from ..engine.preview import grid
from .common import CATEGORY, CONCEPT, CONCEPT_SET, with_preview


class UnconfusedSIDCaptioner:
    """Captions a concept's photos the SID way (paper Case 3) and validates/repairs every caption."""

    NODE_ID = "UnconfusedSIDCaptioner"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "concept": (CONCEPT,),
                "backend": (BACKENDS, {"default": BACKENDS[0], "tooltip":
                            "openai-compatible: a chat-completions server with image input (OpenAI, Ollama, "
                            "LM Studio, vLLM, llama.cpp). local transformers: a model folder in models/LLM. "
                            "manual: your captions below (or the concept's own) are checked and repaired. "
                            "template: 'a photo of <token> <class>' (the baseline to compare SID with)"}),
                "mode": (sid.MODES, {"default": "subject", "tooltip":
                         "subject: an object, pet or person. style: a painting/cartoon style (captions start "
                         "'A painting in the style of <token> <class>' and describe content, not style)"}),
                "describe_pose": ("BOOLEAN", {"default": False, "tooltip":
                                  "Also describe the subject's pose and facial expression (paper D.2: lets prompts "
                                  "change a strong expression of the photos)"}),
                "instruction": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": sid.SUBJECT_INSTRUCTION, "tooltip":
                                "What the model is told. {subject} = '<token> <class>', {class_word}. In style "
                                "mode this default text is replaced by the style instruction"}),
                "base_url": ("STRING", {"default": "http://127.0.0.1:11434/v1", "tooltip":
                             "OpenAI-compatible base URL: https://api.openai.com/v1, Ollama "
                             "http://127.0.0.1:11434/v1, LM Studio http://127.0.0.1:1234/v1"}),
                "model": ("STRING", {"default": vlm.DEFAULT_MODEL, "tooltip": "Model name on that server. "
                          "Default qwen2.5vl (Ollama; 7B, about 6 GB): follows 'do not describe the subject' far "
                          "better than llava, which the SID paper found over-describes it. Others: gpt-4o "
                          "(the paper used GPT-4V), gemma3, llama3.2-vision, minicpm-v"}),
                "api_key_env": ("STRING", {"default": "", "tooltip":
                                "NAME of the environment variable holding the API key, e.g. OPENAI_API_KEY "
                                "(never the key itself: this text is saved in the workflow). Empty = no key "
                                "(local servers). The key is sent only to this base_url, and only over https "
                                "unless the server is on this machine"}),
                "local_model": (_local_choices(), {"tooltip": "A transformers vision-language model folder in "
                                                              "models/LLM (loaded offline, unloaded after use)"}),
                "device": (host.DEVICE_CHOICES, {"default": "auto"}),
                "precision": (["auto", "fp32", "fp16", "bf16"], {"default": "auto"}),
                "manual_captions": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "", "tooltip":
                                    "manual backend: one caption per photo, one per line (empty = the concept's "
                                    "own captions, e.g. edited .txt sidecars)"}),
                "on_flagged": (sid.ON_FLAGGED, {"default": sid.ON_FLAGGED[0], "tooltip":
                               "A caption that cannot be repaired (no subject, describes the subject, refusal): "
                               "train on the template caption instead, keep it, or stop. An uninformative one "
                               "(no detail of anything but the subject, paper Case 1/2) is kept, not templated"}),
                "template": ("STRING", {"default": sid.BASELINE_TEMPLATE, "tooltip":
                             "Baseline/fallback caption; {subject} = '<token> <class>'"}),
            },
            "optional": {
                "timeout": ("FLOAT", {"default": 120.0, "min": 1.0, "max": 3600.0, "step": 1.0,
                                      "tooltip": "seconds per request"}),
                "retries": ("INT", {"default": 4, "min": 0, "max": 20, "tooltip":
                            "retries on 429/5xx/timeouts, with exponential backoff"}),
                "concurrency": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "requests at a time"}),
                "max_tokens": ("INT", {"default": 300, "min": 16, "max": 4096}),
                "temperature": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 2.0, "step": 0.05}),
                "max_image_side": ("INT", {"default": 1024, "min": 64, "max": 4096, "tooltip":
                                   "images are downscaled to this longer side before sending"}),
            },
        }

    RETURN_TYPES = (CONCEPT, "STRING", "STRING", "INT")
    RETURN_NAMES = ("concept", "captions", "report", "flagged")
    FUNCTION = "caption"
    CATEGORY = f"{CATEGORY}/captions"
    OUTPUT_NODE = True  # shows the captions preview even with nothing connected

    def caption(self, concept, backend, mode, describe_pose, instruction, base_url, model, api_key_env,
                local_model, device, precision, manual_captions, on_flagged, template, timeout=120.0, retries=4,
                concurrency=4, max_tokens=300, temperature=0.2, max_image_side=1024):
        settings = dict(backend=backend, mode=mode, describe_pose=describe_pose, instruction=instruction,
                        base_url=base_url, model=model, api_key_env=api_key_env, local_model=local_model,
                        device=device, precision=precision, on_flagged=on_flagged, template=template,
                        timeout=timeout, retries=retries, concurrency=concurrency, max_tokens=max_tokens,
                        temperature=temperature, max_image_side=max_image_side)
        lines = [ln.strip() for ln in (manual_captions or "").splitlines() if ln.strip()]
        out, captions, checks, pils = caption_concept(self.NODE_ID, concept, lines, **settings)
        report = sid.report(checks, concept.token)
        flagged = sum(c.flagged for c in checks)
        result = with_preview((out, "\n".join(captions), report, flagged), [_sheet(pils, checks, captions)], "sid")
        result["ui"]["text"] = [report]
        return result


def _sheet(pils, checks, captions, tokens=None):
    tokens = tokens or [""] * len(checks)
    labels = [(f"{t}#{c.index} FLAGGED ({'template used' if cap != c.caption else 'kept'}): {c.caption}"
               if c.flagged else f"{t}#{c.index} {c.status}: {cap}") for c, cap, t in zip(checks, captions, tokens)]
    return grid(pils, labels, cell=256, columns=4, caption_lines=6, marks=[c.flagged for c in checks])


class UnconfusedSIDCaptionSet(UnconfusedSIDCaptioner):
    """The same for every concept of a concept set (e.g. a loaded one), with one shared setting."""

    NODE_ID = "UnconfusedSIDCaptionSet"

    @classmethod
    def INPUT_TYPES(cls):
        spec = super().INPUT_TYPES()
        req = dict(spec["required"])
        del req["concept"]
        req = {"concept_set": (CONCEPT_SET,), **req}
        req["manual_captions"] = ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "", "tooltip":
                                  "manual backend: one caption per photo, one per line, all concepts in the "
                                  "set's order (empty = the concepts' own captions)"})
        return {"required": req, "optional": spec["optional"]}

    RETURN_TYPES = (CONCEPT_SET, "STRING", "STRING", "INT")
    RETURN_NAMES = ("concept_set", "captions", "report", "flagged")

    def caption(self, concept_set, backend, mode, describe_pose, instruction, base_url, model, api_key_env,
                local_model, device, precision, manual_captions, on_flagged, template, timeout=120.0, retries=4,
                concurrency=4, max_tokens=300, temperature=0.2, max_image_side=1024):
        settings = dict(backend=backend, mode=mode, describe_pose=describe_pose, instruction=instruction,
                        base_url=base_url, model=model, api_key_env=api_key_env, local_model=local_model,
                        device=device, precision=precision, on_flagged=on_flagged, template=template,
                        timeout=timeout, retries=retries, concurrency=concurrency, max_tokens=max_tokens,
                        temperature=temperature, max_image_side=max_image_side)
        lines = [ln.strip() for ln in (manual_captions or "").splitlines() if ln.strip()]
        total = sum(len(c.images) for c in concept_set.concepts)
        if lines and len(lines) != total:
            raise UnconfusedError(f"{len(lines)} caption lines for {total} photos in the set: write one caption "
                                  "per photo, one per line, concept after concept",
                                  input="manual_captions")
        concepts, all_caps, reports, flagged, pils_all, checks_all, tokens = [], [], [], 0, [], [], []
        for c in concept_set.concepts:
            mine, lines = lines[:len(c.images)], lines[len(c.images):]
            out, caps, checks, pils = caption_concept(self.NODE_ID, c, mine, **settings)
            concepts.append(out)
            all_caps += caps
            reports.append(sid.report(checks, c.token))
            flagged += sum(k.flagged for k in checks)
            pils_all += pils
            checks_all += checks
            tokens += [c.token + " "] * len(checks)
        cs = replace(concept_set, concepts=concepts)
        report = "\n\n".join(reports)
        result = with_preview((cs, "\n".join(all_caps), report, flagged), [_sheet(pils_all, checks_all, all_caps, tokens)],
                              "sid")
        result["ui"]["text"] = [report]
        return result


_NODES = [UnconfusedSIDCaptioner, UnconfusedSIDCaptionSet]
NODE_CLASS_MAPPINGS = {n.NODE_ID: n for n in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {"UnconfusedSIDCaptioner": "SID Captioner (Unconfused)",
                              "UnconfusedSIDCaptionSet": "SID Captioner for a Concept Set (Unconfused)"}
