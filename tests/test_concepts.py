"""Concept pool: the rule-based extractor on ShapesWorld captions and hand-written sentences.

The ShapesWorld check is independent of the extractor: the expected concepts are the shape names
the generator drew (from `render_scene`'s objects), and the expected counts come from matching the
generator's own singular/plural shape words in the captions with a regex.
"""

from __future__ import annotations

import collections
import re

import pytest

from regionclip_jax.data import concepts, shapesworld
from regionclip_jax.data.commands import add_concepts_arguments, concepts_command


def _scenes(n=60):
    return [shapesworld.render_scene(i, seed=3) for i in range(n)]


def test_shapesworld_concepts_are_the_shapes(tmp_path):
    scenes = _scenes()
    caps = [c for s in scenes for c in s.captions]
    txt = tmp_path / "caps.txt"
    txt.write_text("\n".join(caps) + "\n")
    # Independent count: each shape word (singular or the generator's plural) in the captions.
    expected = collections.Counter()
    for shape in shapesworld.SHAPES:
        pat = re.compile(rf"\b({shape}|{shapesworld.PLURALS[shape]})\b")
        expected[shape] = sum(len(pat.findall(c)) for c in caps)
    drawn = {o.shape for s in scenes for o in s.kept}
    assert drawn == set(shapesworld.SHAPES)

    counts, method = concepts.count_concepts(caps, method="rules")
    assert method == "rules"
    for shape in shapesworld.SHAPES:
        assert counts[shape] == expected[shape], shape
    # No colour, size or number word becomes a concept.
    for w in (*shapesworld.COLORS, "small", "little", "tiny", "large", "big", "two", "a"):
        assert counts[w] == 0, w

    out = tmp_path / "pool.txt"
    parser = __import__("argparse").ArgumentParser()
    add_concepts_arguments(parser)
    args = parser.parse_args([str(txt), "--out", str(out), "--min-count", "5", "--method", "rules"])
    assert concepts_command(args) == 0
    pool = concepts.load_concepts(str(out))
    assert set(shapesworld.SHAPES) <= set(pool)
    # Sorted by frequency (ties alphabetical); counts file agrees; threshold applied.
    rows = [
        line.split("\t") for line in (tmp_path / "pool.txt.counts.tsv").read_text().splitlines()
    ]
    assert [r[0] for r in rows] == pool
    ns = [int(r[1]) for r in rows]
    assert ns == sorted(ns, reverse=True) and min(ns) >= 5
    assert all(counts[c] == n for c, n in zip(pool, ns))
    assert all(n < 5 for c, n in counts.items() if c not in pool)


@pytest.mark.parametrize(
    "caption, nouns",
    [
        ("A man riding a horse next to a fire hydrant.", ["man", "horse", "hydrant"]),
        ("Two women holding umbrellas in the rain", ["woman", "umbrella", "rain"]),
        ("three boxes, two buses and some glasses", ["box", "bus", "glasses"]),
        ("a dog's bowl on the kitchen floor", ["dog", "bowl", "floor"]),
        ("knives and leaves near the cherries", ["knife", "leaf", "cherry"]),
    ],
)
def test_rules_on_sentences(caption, nouns):
    assert concepts.extract_nouns_rules(caption) == nouns


def test_shard_input_and_spacy_request(tmp_path):
    shapesworld.generate(str(tmp_path / "sw"), num_train=20, num_val=0, seed=1, image_size=32)
    caps = list(concepts.iter_captions([str(tmp_path / "sw" / "train")]))
    assert len(caps) == 20 * 5
    if concepts.spacy_model_name() is None:
        with pytest.raises(ImportError, match="spaCy"):
            concepts.count_concepts(caps, method="spacy")


def test_bad_inputs_name_the_file_and_nothing_is_written(tmp_path):
    """Non-UTF-8 captions (file:line), an empty corpus, an empty concept file: clear errors."""
    out = tmp_path / "new" / "pool.txt"
    latin1 = tmp_path / "caps.txt"
    latin1.write_bytes(b"a dog on a sofa\na caf\xe9 table\n")
    with pytest.raises(ValueError, match=r"caps.txt:2: caption file is not UTF-8 text"):
        concepts.build_concept_pool([str(latin1)], str(out), min_count=1, method="rules")
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text('{"caption": "a dog"}\n{"caption": "a cat"\n')
    with pytest.raises(ValueError, match=r"caps.jsonl:2: not valid JSON"):
        concepts.build_concept_pool([str(jsonl)], str(out), min_count=1, method="rules")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no captions in .*empty.txt"):
        concepts.build_concept_pool([str(empty)], str(out), min_count=1, method="rules")
    assert not out.exists()
    (tmp_path / "blank_pool.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match=r"blank_pool.txt: no concepts"):
        concepts.load_concepts(str(tmp_path / "blank_pool.txt"))
    (tmp_path / "one.txt").write_text("a dog\n")
    with pytest.raises(ValueError, match=r"no concept is mentioned at least 5 times .*dog \(1\)"):
        concepts.build_concept_pool(
            [str(tmp_path / "one.txt")], str(out), min_count=5, method="rules"
        )
