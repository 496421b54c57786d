"""The concept pool: frequent object nouns of a caption corpus (`regionclip-jax concepts`).

RegionCLIP parses the captions of its pretraining corpus with an off-the-shelf parser, keeps the
object nouns whose frequency is >= 100, and uses them as the concept pool (4,764 concepts on COCO
Captions, 6,790 on CC3M; spec §4 / paper §4.1). Here:

  - with spaCy and an English model installed (`en_core_web_sm`, `_md`, `_lg`, `_trf`; this
    package does not install one), a concept is the lemma of each noun chunk's root, with the
    root's compound modifiers in front ("fire hydrant", "tennis racket");
  - otherwise an offline rule-based fallback (`extract_nouns_rules`), described below.

Counting: every mention counts (a caption naming "dog" twice counts 2). Concepts with
count >= `min_count` (paper: 100) are written one per line, most frequent first (ties in
alphabetical order), to a text file that `load_concepts` reads back for
`regionclip_jax.text.prompt_ensemble_embeddings(encode_text, load_concepts(path))`. A second file
`<output>.counts.tsv` holds `concept<TAB>count` for every concept written.

The rule-based fallback (its limits are real; prefer spaCy for real corpora):
  1. lower-case, split into words (letters, inner hyphens and apostrophes); digits, punctuation
     and the word lists below break a phrase;
  2. a phrase is a maximal run of words that are not stop words (articles, pronouns,
     prepositions, conjunctions, auxiliaries, number words), common caption verbs, words ending
     in "ing" (participles: "riding", "standing") or in "ly" (adverbs);
  3. within a phrase, adjectives from a shipped list (colours, sizes, shapes of things, common
     qualities) are dropped; the *last* remaining word is the head noun, which is the concept;
  4. the head is lemmatised: irregular plurals from a table, then suffix rules
     (-ies -> -y, -sses/-xes/-zes/-ches/-shes -> drop "es", -ves -> -f / -fe for a list, other
     trailing -s dropped except after s/u/i: "glass", "bus", "tennis").
  Limits: compound nouns become their head ("fire hydrant" -> "hydrant"); a noun used as a
  verb or adjective that is not in the lists is taken as a noun ("a dog park" -> "park" is
  right, "the man walks" -> "walks"/"walk" when "walks" is not in the verb list); words ending in
  "ing" are never nouns ("building", "painting", "ceiling" are lost); lemmatisation errs on
  rare words ("lenses" -> "lense"). Only English.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Iterable, Iterator, Sequence

from regionclip_jax.data.input_files import decode_utf8, json_line, load_json_file, read_utf8
from regionclip_jax.data.shards import ShardReader

# -- word lists of the fallback -------------------------------------------------------------

STOP_WORDS = frozenset(
    """a an the this that these those there here it its it's they them their theirs he him his
    she her hers we us our you your i me my mine some any each every all both either neither no
    not nor none of in on at by for with without from to into onto over under above below
    across along around behind beside besides between beyond near off out up down through
    toward towards upon within against among about after before during while until since than
    as like and or but so yet if then also just very too quite rather is are was were be been
    being am has have had having do does did done can could will would shall should may might
    must one two three four five six seven eight nine ten eleven twelve twenty many several few
    more most much lots lot other another such same own what which who whom whose where when
    why how who's what's something someone somebody anything nothing everything thing things
    photo photograph picture image drawing view shot close closeup""".split()
)
# Image-framing words ("a photo of") are stop words: they are never object concepts here.

VERBS = frozenset(
    """sits sit sat stands stand stood lies lie lay holds hold held looks look looked walks walk
    walked rides ride rode runs run ran plays play played eats eat ate flies fly flew shows show
    showed shown contains contain contained waits wait parked park's covered filled made topped
    made sitting seen placed displayed stacked lined hanging hangs hang goes go went gets get
    got takes take took uses use used appears appear seems seem wears wear wore carries carry
    carried watches watch watched jumps jump jumped swims swim drives drive drove""".split()
)
# "watch", "park", "fly", "run", "ride" are also nouns; they are listed only in forms that are
# usually verbs after a subject ("sits", "parked"). The bare forms stay verbs: an acceptable loss.

ADJECTIVES = frozenset(
    """red orange yellow green cyan blue purple pink brown black white gray grey silver gold
    golden beige tan dark light bright pale colorful colourful multicolored small little tiny
    large big huge giant tall short long wide narrow thin thick fat round square-shaped old new
    young modern ancient empty full open closed clean dirty wet dry hot cold warm cool fresh
    beautiful pretty cute ugly nice good great bad best other several various different many
    single double whole half wooden metal metallic plastic glass-like striped spotted plain
    noisy gradient shiny busy quiet sunny cloudy rainy snowy grassy sandy rocky leafy
    delicious tasty healthy heavy low high front back top bottom left right middle side upper
    lower inner outer first second third last next main large-scale""".split()
)

IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "persons": "person",
    "feet": "foot", "teeth": "tooth", "geese": "goose", "mice": "mouse", "oxen": "ox",
    "sheep": "sheep", "deer": "deer", "fish": "fish", "buses": "bus", "bases": "base",
    "cases": "case", "vases": "vase", "houses": "house", "horses": "horse", "glasses": "glasses",
    "scissors": "scissors", "skis": "ski", "tomatoes": "tomato", "potatoes": "potato",
    "heroes": "hero", "mangoes": "mango", "dice": "die", "criteria": "criterion",
    "cacti": "cactus", "pants": "pants", "jeans": "jeans", "shorts": "shorts", "series": "series",
    "species": "species", "news": "news", "lenses": "lens", "boxes": "box", "foxes": "fox",
}  # fmt: skip
_VES_TO_FE = frozenset({"knives", "wives", "lives"})
_WORD = re.compile(r"[a-z]+(?:['\-][a-z]+)*")


def singular(word: str) -> str:
    """English plural -> singular by a table and suffix rules (see the module docstring)."""
    w = word.lower()
    if w in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[w]
    if len(w) <= 3:
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith("ves"):
        return w[:-3] + ("fe" if w in _VES_TO_FE else "f")
    if w.endswith(("sses", "xes", "zes", "ches", "shes")):
        return w[:-2]
    if w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def _break_word(w: str) -> bool:
    return (
        w in STOP_WORDS
        or w in VERBS
        or (w.endswith("ing") and len(w) > 4)
        or (w.endswith("ly") and len(w) > 4)
        or w.endswith("'s")
        and w[:-2] in STOP_WORDS
    )


def extract_nouns_rules(caption: str) -> list[str]:
    """Concept mentions of one caption by the fallback rules (module docstring), in order."""
    out = []
    # Punctuation and digits break phrases: split the caption into segments first.
    for segment in re.split(r"[^a-zA-Z'\-\s]+", caption.lower()):
        phrase: list[str] = []
        for w in [*_WORD.findall(segment), "the"]:  # a final stop word closes the last phrase
            if w.endswith("'s") and w not in STOP_WORDS:
                w = w[:-2]  # possessive: "dog's bowl" -> dog, bowl (two phrases)
                phrase.append(w)
                w = "the"
            if _break_word(w):
                content = [x for x in phrase if x not in ADJECTIVES and len(x) > 1]
                if content:
                    out.append(singular(content[-1]))
                phrase = []
            else:
                phrase.append(w)
    return out


def spacy_model_name() -> str | None:
    """The name of an installed English spaCy model, or None (spaCy or model missing)."""
    try:
        # lazy: spaCy is optional (not a dependency of the package)
        import spacy.util
    except ImportError:
        return None
    installed = set(spacy.util.get_installed_models())
    for name in ("en_core_web_sm", "en_core_web_md", "en_core_web_lg", "en_core_web_trf"):
        if name in installed:
            return name
    return None


def _spacy_mentions(captions: Iterable[str], model: str, batch_size: int) -> Iterator[str]:
    # lazy: spaCy is optional (not a dependency of the package)
    import spacy

    nlp = spacy.load(model, disable=["ner"])
    for doc in nlp.pipe(captions, batch_size=batch_size):
        for chunk in doc.noun_chunks:
            root = chunk.root
            if root.pos_ not in ("NOUN", "PROPN"):
                continue
            parts = [t.lemma_.lower() for t in root.lefts if t.dep_ == "compound"]
            yield " ".join([*parts, root.lemma_.lower()])


def iter_captions(paths: Sequence[str]) -> Iterator[str]:
    """Captions of shard directories/manifests, COCO captions json, JSONL or plain text files.

    Text files hold one caption per line; JSONL lines need a "caption"/"captions"/"text" key.
    Files must be UTF-8: a read error names the file and the line.
    """
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path) or path.endswith("manifest.json"):
            with ShardReader(path) as reader:
                for rec in reader:
                    yield from rec["captions"]
        elif path.endswith(".json"):
            data = load_json_file(path, "COCO captions json")
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a COCO captions json object")
            for ann in data.get("annotations", []):
                if "caption" in ann:
                    yield str(ann["caption"])
        elif path.endswith((".jsonl", ".ndjson")):
            for lineno, line in _utf8_lines(path, "JSON Lines file"):
                if not line.strip():
                    continue
                obj = json_line(line, path, lineno)
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
                caps = obj.get("captions", obj.get("caption", obj.get("text", [])))
                yield from [caps] if isinstance(caps, str) else caps
        else:
            for _, line in _utf8_lines(path, "caption file"):
                if line.strip():
                    yield line.rstrip("\r\n")


def _utf8_lines(path: str, what: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 file, streamed; errors name file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, decode_utf8(raw, path, what, first_line=lineno)


def count_concepts(
    captions: Iterable[str], *, method: str = "auto", batch_size: int = 256
) -> tuple[collections.Counter, str]:
    """Counts concept mentions; returns (counter, method used: "spacy:<model>" or "rules")."""
    model = spacy_model_name() if method in ("auto", "spacy") else None
    if method == "spacy" and model is None:
        raise ImportError(
            "method='spacy' needs spaCy and an English model (e.g. en_core_web_sm) installed"
        )
    counts: collections.Counter = collections.Counter()
    if model is not None:
        counts.update(_spacy_mentions(captions, model, batch_size))
        return counts, f"spacy:{model}"
    for c in captions:
        counts.update(extract_nouns_rules(c))
    return counts, "rules"


def frequent_concepts(counts: collections.Counter, min_count: int = 100) -> list[tuple[str, int]]:
    """(concept, count) with count >= min_count, most frequent first, ties alphabetical."""
    kept = [(c, n) for c, n in counts.items() if n >= min_count]
    return sorted(kept, key=lambda cn: (-cn[1], cn[0]))


def write_concepts(path: str, concepts: Sequence[tuple[str, int]]) -> None:
    """Writes `path` (one concept per line) and `path.counts.tsv` (concept<TAB>count)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{c}\n" for c, _ in concepts)
    with open(path + ".counts.tsv", "w", encoding="utf-8") as f:
        f.writelines(f"{c}\t{n}\n" for c, n in concepts)


def load_concepts(path: str) -> list[str]:
    """Concept names of a file written by `write_concepts` (blank lines and '#' lines ignored).

    Raises:
      ValueError: the file is not UTF-8 (naming the line) or holds no concept.
    """
    text = read_utf8(path, "concept file")
    names = [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]
    if not names:
        raise ValueError(f"{path}: no concepts (the concept file is empty)")
    return names


def build_concept_pool(
    inputs: Sequence[str],
    output: str,
    *,
    min_count: int = 100,
    method: str = "auto",
    max_concepts: int | None = None,
) -> dict:
    """Counts, thresholds and writes the pool; returns a summary dict.

    Raises:
      ValueError: no captions in `inputs`, or no concept mentioned `min_count` times (nothing is
        written then); OSError: the folder of `output` cannot be created (checked first).
    """
    missing = [p for p in inputs if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(2, "No such input", os.fspath(missing[0]))
    # Before the (possibly hours of) counting: the output's folder exists and is writable.
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isdir(output):
        raise IsADirectoryError(21, "--out is a folder, give a file name", output)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(13, "cannot write into the folder of --out", out_dir)
    n_captions = 0

    def counted():
        nonlocal n_captions
        for c in iter_captions(inputs):
            n_captions += 1
            yield c

    counts, used = count_concepts(counted(), method=method)
    if n_captions == 0:
        raise ValueError(f"no captions in {', '.join(map(os.fspath, inputs))}: nothing to count")
    concepts = frequent_concepts(counts, min_count)
    if not concepts:
        top = ", ".join(f"{c} ({n})" for c, n in frequent_concepts(counts, 1)[:5]) or "none"
        raise ValueError(
            f"no concept is mentioned at least {min_count} times in {n_captions:,} captions "
            f"(most frequent: {top}): lower --min-count"
        )
    if max_concepts is not None:
        concepts = concepts[:max_concepts]
    write_concepts(output, concepts)
    return {
        "captions": n_captions,
        "distinct": len(counts),
        "concepts": len(concepts),
        "min_count": min_count,
        "method": used,
        "output": output,
        "top": concepts[:10],
    }
