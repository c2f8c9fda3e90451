"""Caption language detectors side by side on a labelled caption set: accuracy and rows/s.

    .venv/bin/pip install -e '.[bench]'        # the other candidates (CLD3 is a runtime dep)
    .venv/bin/python benchmarks/bench_language.py [--rows 20000]

The set (laion_assets_tests/data/caption_languages.tsv) holds short caption-like texts in 28
languages and captions with no language (file names, codes, numbers, prices) labelled nolang.
Each detector decides "nolang" by its own notion of an unsure answer (CLD3: not is_reliable, as
LAION did; pycld2: not isReliable or unknown; lingua: no language; langid: probability < 0.5).
Candidates that are not installed are skipped. Prints accuracy on languages, on nolang, overall,
load time and rows/s on `--rows` captions (the set repeated), one core.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

SET = Path(__file__).resolve().parent.parent / "laion_assets_tests" / "data" / "caption_languages.tsv"


def load_set() -> list[tuple[str, str]]:
    with SET.open(newline="") as f:
        return [(row["language"], row["caption"]) for row in csv.DictReader(f, delimiter="\t")]


def cld3_laion():
    from laion_assets.core.scores import language

    language.detect("warm up")
    return lambda t: language.detect(t).language


def pycld2():
    import pycld2 as cld2

    def run(t):
        try:
            reliable, _, details = cld2.detect(t)
        except Exception:  # invalid utf-8 and the like
            return "nolang"
        code = details[0][1]
        return code.split("-")[0] if reliable and code != "un" else "nolang"

    return run


def lingua():
    from lingua import LanguageDetectorBuilder

    detector = LanguageDetectorBuilder.from_all_languages().build()

    def run(t):
        lang = detector.detect_language_of(t)
        return lang.iso_code_639_1.name.lower() if lang else "nolang"

    return run


def py3langid():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def run(t):
        code, prob = ident.classify(t)
        return code if prob >= 0.5 else "nolang"

    return run


CANDIDATES = {"cld3 (LAION's rule)": cld3_laion, "pycld2": pycld2, "lingua": lingua, "py3langid": py3langid}
ALIASES = {"iw": "he", "zh-hant": "zh", "zh-tw": "zh"}  # old or regional codes some detectors emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    args = parser.parse_args()
    labelled = load_set()
    texts = [t for _, t in labelled]
    stream = (texts * (args.rows // len(texts) + 1))[: args.rows]
    print(f"{len(labelled)} labelled captions, {sum(lab == 'nolang' for lab, _ in labelled)} nolang; speed on {len(stream)} rows\n")
    print(f"{'detector':<22} {'languages':>9} {'nolang':>7} {'overall':>8} {'load s':>7} {'rows/s':>9}")
    results = {}
    for name, make in CANDIDATES.items():
        try:
            started = time.perf_counter()
            run = make()
            load = time.perf_counter() - started
        except ImportError as e:
            print(f"{name:<22} not installed ({e.name}): pip install -e '.[bench]'")
            continue
        got = [ALIASES.get(run(t), run(t)) for t in texts]
        lang_ok = [g == lab for (lab, _), g in zip(labelled, got) if lab != "nolang"]
        nolang_ok = [g == lab for (lab, _), g in zip(labelled, got) if lab == "nolang"]
        started = time.perf_counter()
        for t in stream:
            run(t)
        rate = len(stream) / (time.perf_counter() - started)
        overall = (sum(lang_ok) + sum(nolang_ok)) / len(labelled)
        results[name] = (overall, rate)
        print(f"{name:<22} {sum(lang_ok) / len(lang_ok):>9.3f} {sum(nolang_ok) / len(nolang_ok):>7.3f} {overall:>8.3f} {load:>7.2f} {rate:>9.0f}")
        wrong = [(lab, t, g) for (lab, t), g in zip(labelled, got) if g != lab]
        for lab, t, g in wrong[:8]:
            print(f"    {lab:>6} -> {g:<7} {t[:60]}")
    if "cld3 (LAION's rule)" in results:
        base_acc, base_rate = results["cld3 (LAION's rule)"]
        print("\nratios to cld3 (LAION's rule):")
        for name, (acc, rate) in results.items():
            print(f"  {name:<22} accuracy {acc - base_acc:+.3f}  speed x{rate / base_rate:.2f}")


if __name__ == "__main__":
    main()
