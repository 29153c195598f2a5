"""Label extraction from captions (nbsupport.data.caption_labels; thesis sections 4.3, 5.6-5.7.1)."""

import logging
import random
from collections import Counter

import pytest

from nbsupport.data import caption_labels as text
from nbsupport.data import synthetic

CAP = "a striped triangle left of a dotted circle above a wavy star on gravel"
CAP2 = "a plain ring right of a checkered square below a zigzag cross on water"


def _taggers():
    out = [text.BuiltinLexiconTagger()]
    try:
        out.append(text.get_tagger("wordnet"))
    except LookupError:
        pass
    return out


@pytest.fixture(params=_taggers(), ids=lambda t: t.name)
def tagger(request):
    return request.param


def test_nouns_and_phrases_of_synthetic_captions(tagger):
    assert text.extract_nouns(CAP, tagger) == ["triangle", "circle", "star", "gravel"]
    assert text.extract_noun_phrases(CAP, tagger) == ["striped triangle", "dotted circle", "wavy star"]
    # "plain" and "square" are also nouns / adjectives in WordNet, "ring" also a verb, "left"/"right" nouns
    assert text.extract_nouns(CAP2, tagger) == ["ring", "square", "cross", "water"]
    assert text.extract_noun_phrases(CAP2, tagger) == ["plain ring", "checkered square", "zigzag cross"]
    assert text.extract_nouns("empty sand", tagger) == ["sand"]
    assert text.candidates(CAP, "np+nouns", tagger)[:4] == [
        "striped triangle",
        "dotted circle",
        "wavy star",
        "triangle",
    ]


def test_every_rendered_caption_yields_its_objects(tagger):
    for i in range(12):
        sc = synthetic.render_scene(synthetic.scene_rng(0, "train", i), size=32, n_objects=(0, 3))
        nouns = text.extract_nouns(sc.caption, tagger)
        assert nouns == list(dict.fromkeys(sc.nouns + [sc.background])), sc.caption
        names = {c.id: c.name for c in synthetic.CLASSES}
        assert (
            text.extract_noun_phrases(sc.caption, tagger)[: len(set(sc.category_ids))]
            == list(dict.fromkeys(names[c] for c in sc.category_ids))
            or not sc.category_ids
        )


def test_wordnet_filter_drops_non_nouns():
    try:
        t = text.get_tagger("wordnet")
    except LookupError:
        pytest.skip("no WordNet data here")
    cap = "A man riding a brown horse twice near the exact red cars"
    assert text.extract_nouns(cap, t) == ["man", "horse", "cars"]  # not 'twice', 'exact'
    assert text.extract_nouns(cap, t, verbs=True) == ["man", "riding", "horse", "cars"]
    assert t(["Jonas"])[0][1] == "NNP" and t(["xqzt"])[0][1] == "FW"


def test_injected_tagger_is_used():
    calls = []

    def fake(tokens):
        calls.append(tokens)
        return [(w, "NN" if w == "dog" else "JJ" if w == "big" else "DT") for w in tokens]

    assert text.extract_nouns("the big dog", fake) == ["dog"]
    assert text.extract_noun_phrases("the big dog", fake) == ["big dog"]
    assert calls and calls[0] == ["the", "big", "dog"]
    with pytest.raises(TypeError, match="tagger"):
        text.extract_nouns("x", 3)
    with pytest.raises(ValueError, match="auto"):
        text.get_tagger("bogus")


def test_pad_and_repeat():
    t = text.BuiltinLexiconTagger()
    lab = text.extract_labels("empty sand", k=3, kind="nouns", pad="pad", tagger=t)
    assert lab.raw == ["sand", text.PAD, text.PAD]
    assert lab.pad == [False, True, True]
    assert lab.prompts[0] == text.TEMPLATES[0].format("sand") and lab.prompts[1] == text.PAD
    rep = text.extract_labels("empty sand", k=3, kind="nouns", pad="repeat", tagger=t)
    assert rep.raw == ["sand", "empty sand", "empty sand"] and rep.pad == [False] * 3
    full = text.extract_labels(CAP, k=3, kind="nouns", tagger=t)
    assert full.raw == ["triangle", "circle", "star"] and not any(full.pad)
    # random sampling: k distinct candidates, each prompted with one of the templates
    r = text.extract_labels(CAP, k=3, kind="np+nouns", tagger=t, rng=random.Random(0))
    pool = text.candidates(CAP, "np+nouns", t)
    assert len(set(r.raw)) == 3 and set(r.raw) <= set(pool)
    assert all(any(p == tpl.format(w) for tpl in text.TEMPLATES) for p, w in zip(r.prompts, r.raw))
    with pytest.raises(ValueError, match="pad"):
        text.extract_labels(CAP, pad="zero", tagger=t)
    with pytest.raises(ValueError, match="kind"):
        text.extract_labels(CAP, kind="verbs", tagger=t)


def test_curated_vocabulary_by_frequency():
    t = text.BuiltinLexiconTagger()
    caps = ["a striped triangle on grass"] * 5 + ["a dotted circle on grass"] * 2 + ["a wavy star on sand"]
    freq = text.label_frequencies(caps, "nouns", t)
    assert freq == Counter({"grass": 7, "triangle": 5, "circle": 2, "star": 1, "sand": 1})
    assert text.curated_vocabulary(freq, 5) == {"grass", "triangle"}
    assert text.curated_vocabulary(freq, 2) == {"grass", "triangle", "circle"}
    # curated labels come first, other nouns fill up (thesis 5.7.1)
    lab = text.extract_labels(
        "a wavy star left of a striped triangle on grass", k=2, tagger=t, vocabulary={"grass", "triangle"}
    )
    assert lab.raw == ["triangle", "grass"]
    lab = text.extract_labels("a wavy star left of a striped triangle on grass", k=3, tagger=t, vocabulary={"grass"})
    assert lab.raw == ["grass", "star", "triangle"]
    with pytest.raises(ValueError, match="min_count"):
        text.curated_vocabulary(freq, 0)


def test_system_wordnet_install(tmp_path):
    if not (text.SYSTEM_WORDNET / "index.noun").is_file():
        pytest.skip("wordnet-base not installed")
    root = text.install_system_wordnet(dest=tmp_path)
    assert root == tmp_path / "corpora" / "wordnet"
    lex = (root / "lexnames").read_text().splitlines()
    assert len(lex) == 45 and lex[3] == "03\tnoun.Tops\t1" and lex[44] == "44\tadj.ppl\t3"
    assert text.install_system_wordnet(src=tmp_path / "nowhere") is None


def test_choice_is_logged(caplog):
    text.get_tagger.cache_clear()
    with caplog.at_level(logging.INFO, logger="nbsupport.data.caption_labels"):
        t = text.get_tagger("auto")
    assert t.name in ("perceptron", "wordnet", "lexicon")
    assert any("tagger" in r.message or "WordNet" in r.message for r in caplog.records)
