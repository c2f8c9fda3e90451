"""LAION's published subsets as subset rules, selectable by name (`subsets: [{preset: laion2b_en}]`).

Each preset is the published rule as data: the space its similarity threshold was published for
(`similarity_model`), the caption-language rule, the pre-filters and the score thresholds. The
columns a preset thresholds come from the heads the config maps to them: `punsafe` (CLIP-based
NSFW head on ViT-L/14), `aesthetic` (aesthetic predictor V1, linear on ViT-L/14), `aesthetic_v2`
(improved aesthetic predictor, MLP on ViT-L/14), `pwatermark` (the watermark classifier).
docs/LAION.md cites where each number comes from and which could not
be verified.
"""

from __future__ import annotations

B32 = "ViT-B-32/openai"
# LAION filtered 2B-multi and 1B-nolang with OpenAI ViT-B/32 images against a multilingual text
# encoder distilled into that space; open_clip's nearest multilingual model is this one (docs/LAION.md).
MCLIP = "xlm-roberta-base-ViT-B-32/laion5b_s13b_b90k"
PREFILTERS = {"min_caption_chars": 5, "min_image_bytes": 5000}


def _preset(description: str, **rule) -> dict:
    return {"description": description, "rule": rule}


PRESETS: dict[str, dict] = {
    "laion400m": _preset(
        "LAION-400M: OpenAI ViT-B/32 image-text cosine >= 0.3; alt text under 5 characters and images under 5 KB dropped",
        similarity_model=B32, min_similarity=0.3, **PREFILTERS,
    ),
    "laion2b_en": _preset(
        "LAION-2B-en: English captions (CLD3, reliable), OpenAI ViT-B/32 cosine >= 0.28; LAION's pre-filters",
        languages=("en",), similarity_model=B32, min_similarity=0.28, **PREFILTERS,
    ),
    "laion2b_multi": _preset(
        "LAION-2B-multi: captions in a language other than English (CLD3, reliable), multilingual CLIP cosine >= 0.26",
        exclude_languages=("en", "nolang"), similarity_model=MCLIP, min_similarity=0.26, **PREFILTERS,
    ),
    "laion1b_nolang": _preset(
        "LAION-1B-nolang: captions without a reliably detected language, multilingual CLIP cosine >= 0.26",
        languages=("nolang",), similarity_model=MCLIP, min_similarity=0.26, **PREFILTERS,
    ),
    "laion_aesthetics_v1": _preset(
        "LAION-Aesthetics V1 (laion-aesthetic): punsafe < 0.5, pwatermark < 0.8, aesthetic (V1, ViT-L/14 linear) > 7",
        below={"punsafe": 0.5, "pwatermark": 0.8}, above={"aesthetic": 7.0},
    ),
    "laion_art": _preset(
        "LAION-Art: LAION-Aesthetics V1's filters with aesthetic (V1) > 8",
        below={"punsafe": 0.5, "pwatermark": 0.8}, above={"aesthetic": 8.0},
    ),
    **{
        f"laion_aesthetics_v2_{str(t).replace('.', '_')}": _preset(
            f"LAION-Aesthetics V2 {t}+: LAION-2B-en rows with improved aesthetic score (MLP on ViT-L/14) >= {t}",
            languages=("en",), similarity_model=B32, min_similarity=0.28, at_least={"aesthetic_v2": t}, **PREFILTERS,
        )
        for t in (4.5, 5, 6, 6.25, 6.5)
    },
    "relaion_research": _preset(
        "Re-LAION-5B research: LAION-5B's rows; the partner hash lists it removes are blocklists, not a score cut",
        **PREFILTERS,
    ),
    "relaion_research_safe": _preset(
        "Re-LAION-5B research-safe: research plus NSFW removed, punsafe < 0.5 (cut not verified, see docs/LAION.md)",
        below={"punsafe": 0.5}, **PREFILTERS,
    ),
}
