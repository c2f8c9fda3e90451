"""Caption language, the way LAION-5B split its captions into en / multi / nolang.

LAION's crawler cleaned each alt text (ftfy, newlines to spaces, non-printable characters
dropped), ran Google's CLD3 (``NNetLanguageIdentifier(min_num_bytes=5, max_num_bytes=2000)``),
kept the language only when CLD3 called it reliable, dropped the script suffix (``bg-Latn`` ->
``bg``) and filed everything else under "nolang". We run the same model (CLD3 ships inside the
``cld3-py`` wheel, imported as ``gcld3``) with the same rule, and keep CLD3's best guess and its
probability too, so a stricter or looser cut can be applied later without running it again.
``benchmarks/bench_language.py`` compares it with other detectors on a labelled caption set.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version

import ftfy

NOLANG = "nolang"
MIN_BYTES, MAX_BYTES = 5, 2000  # LAION's CLD3 settings


def detector_name() -> str:
    """What made the language column: recorded with every row and in every recipe."""
    return f"cld3/cld3-py-{version('cld3-py')}/min{MIN_BYTES}-max{MAX_BYTES}"


@lru_cache(maxsize=1)
def _cld3():
    import gcld3

    return gcld3.NNetLanguageIdentifier(min_num_bytes=MIN_BYTES, max_num_bytes=MAX_BYTES)


def clean(caption: str | None) -> str:
    """LAION's alt-text cleaning before detection."""
    text = ftfy.fix_text((caption or "").replace("\n", " ")).strip()
    return "".join(c for c in text if c.isprintable())


@dataclass(frozen=True)
class Detected:
    language: str  # CLD3's code (ISO 639-1, or -3; Hebrew is "iw") when reliable, else "nolang"
    guess: str | None  # CLD3's best language even when unreliable; None when it has none
    confidence: float  # CLD3's probability of `guess` (0 when none)
    chars: int  # length of the cleaned caption: what LAION's "alt text < 5 characters" counted


def detect(caption: str | None) -> Detected:
    text = clean(caption)
    res = _cld3().FindLanguage(text=text)
    guess = None if res.language == "und" else res.language.split("-")[0]
    if guess is None:
        return Detected(NOLANG, None, 0.0, len(text))
    return Detected(guess if res.is_reliable else NOLANG, guess, float(res.probability), len(text))
