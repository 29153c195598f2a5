"""Labels from captions for GroupViT's multi-label contrastive loss (thesis sections 4.3, 5.6-5.7.1).

GroupViT tags every caption with NLTK, keeps the nouns (Penn tags ``NN``, ``NNS``, ``NNP``; the reference
code also keeps verb tags), samples up to ``K`` of them, puts each into a prompt template and, when fewer
than ``K`` are found, fills the remaining slots with the caption itself. The thesis adds

- noun phrases (adjectives + nouns, a ``RegexpParser`` grammar) beside the nouns ("NP+Nouns", Table 7),
- ``<PAD>`` labels instead of the repeated caption, whose embeddings are nulled (section 5.7, Table 9):
  :func:`extract_labels` returns a pad mask the losses use,
- curated label sets: only nouns seen at least ``min_count`` times in the corpus are preferred (section
  5.7.1, Table 10): :func:`label_frequencies`, :func:`curated_vocabulary`.

Tagging needs data NLTK cannot download here, so the tagger is chosen by :func:`get_tagger` (and is
injectable everywhere as ``tagger=``):

1. ``"perceptron"``: ``nltk.pos_tag`` (averaged perceptron) when its data is installed (real users);
2. ``"wordnet"``: a WordNet lexicon filter (WordNet 3.0 from NLTK's data, or Debian's ``wordnet-base`` in
   ``/usr/share/wordnet``, copied into a private NLTK data dir under ``cache_dir()/nltk_data``): a word is a
   noun only if WordNet knows it as one, which also drops the thesis's complaint words ("twice", "exact");
3. ``"lexicon"``: a small built-in lexicon (closed-class words, the synthetic world's vocabulary, suffix
   rules) that needs no data at all.

The choice is logged (``logging.info``) and visible as ``tagger.name``.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from nbsupport.core import paths

log = logging.getLogger(__name__)


NOUN_TAGS = ("NN", "NNS", "NNP")


VERB_TAGS = ("VBG", "VB", "VBD", "VBN", "VBP", "VBZ")  # the reference code keeps these too


#: Noun phrase = optional adjectives followed by one or more nouns (thesis section 5.6).
NP_GRAMMAR = "NP: {<JJ.*>*<NN.*>+}"


PAD = "<PAD>"


#: CLIP's 7-template ensemble (the thesis prompts labels with 7 templates, section 4.3).
TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


KINDS = ("nouns", "np", "np+nouns")


# ============================================================================================== tokenising
_TOKEN = re.compile(r"[A-Za-z]+(?:[-'][A-Za-z]+)*|\d+|[^\sA-Za-z\d]")


def tokenize(text: str) -> list[str]:
    """Words of a caption: NLTK's Treebank tokenizer (needs no data), else a regex."""
    try:
        from nltk.tokenize import TreebankWordTokenizer

        return TreebankWordTokenizer().tokenize(text)
    except ImportError:  # pragma: no cover - nltk is a dependency
        return _TOKEN.findall(text)


# ============================================================================================== taggers
_CLOSED = {
    "DT": "a an the this that these those some any each every no another both either neither all",
    "IN": "of on in at by with without from to into onto over under above below behind near beside between "
    "across through along around against among inside outside toward towards upon during after before "
    "off up down out while like than via amid atop beneath underneath",
    "CC": "and or but nor yet so",
    "PRP": "i you he she it we they me him her us them itself themselves himself herself",
    "PRP$": "my your his its our their",
    "VBZ": "is has does",
    "VBP": "are have do",
    "VBD": "was were had did",
    "VB": "be",
    "VBN": "been",
    "MD": "can could will would shall should may might must",
    "RB": "very not too also just there here together next nearby away only still almost twice",
    "CD": "one two three four five six seven eight nine ten eleven twelve several",
    "WDT": "which that what",
    "EX": "there",
}


CLOSED_CLASS = {w: t for t, ws in _CLOSED.items() for w in ws.split()}


#: The synthetic world's caption vocabulary (nbsupport.data.synthetic) and a few everyday words.
_BUILTIN_NOUNS = (
    "triangle circle square star ring cross gravel grass sand water wood man woman person people "
    "child boy girl dog cat horse bird car bus train truck plane bike bicycle table chair street "
    "road tree sky field room kitchen plate food pizza bed"
)


_BUILTIN_ADJS = (
    "striped dotted checkered wavy plain zigzag empty small large big little red green blue yellow "
    "white black brown young old"
)


class Tagger:
    """A part-of-speech tagger: ``tagger(tokens) -> [(token, Penn tag), ...]``; ``name`` says which one."""

    name = "base"

    def __call__(self, tokens: list[str]) -> list[tuple[str, str]]:
        raise NotImplementedError

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


class PerceptronTagger(Tagger):
    """NLTK's averaged perceptron (``nltk.pos_tag``), the tagger GroupViT uses; needs its downloaded data."""

    name = "perceptron"

    def __init__(self):
        import nltk

        self._tag = nltk.pos_tag
        self._tag(["a", "dog"])  # raises LookupError when the model data is missing

    def __call__(self, tokens):
        return list(self._tag(list(tokens))) if tokens else []


class _LexiconTagger(Tagger):
    """Right-to-left lexicon tagging: closed-class words from a list; an open-class word is an adjective
    when it can be one and the next word is a noun or adjective, else a noun if it can be one, else an
    adjective / verb / adverb; "left"/"right" before "of" are adverbs (spatial relations)."""

    def pos(self, word: str) -> set[str]:
        """Open-class parts of speech of a lower-case word: subset of {"n", "a", "v", "r"}."""
        raise NotImplementedError

    def plural(self, word: str) -> bool:
        return False

    def gerund(self, word: str) -> bool:
        """Whether ``word`` is an ``-ing`` form of a verb (not a noun like "ring")."""
        return word.endswith("ing") and len(word) > 5

    def unknown(self, word: str, original: str) -> str:
        return "NNP" if original[:1].isupper() else "FW"

    def __call__(self, tokens):
        tags = [""] * len(tokens)
        for i in range(len(tokens) - 1, -1, -1):
            orig = tokens[i]
            w = orig.lower()
            nxt = tags[i + 1] if i + 1 < len(tokens) else ""
            if not re.search(r"[a-z]", w):
                tags[i] = "CD" if w.isdigit() else "."
            elif w in ("left", "right") and i + 1 < len(tokens) and tokens[i + 1].lower() == "of":
                tags[i] = "RB"
            elif w in CLOSED_CLASS:
                tags[i] = CLOSED_CLASS[w]
            else:
                p = self.pos(w)
                if "a" in p and (nxt.startswith("NN") or nxt == "JJ"):
                    tags[i] = "JJ"
                elif "v" in p and self.gerund(w) and nxt in ("DT", "IN", "PRP$", "RB", "CD"):
                    tags[i] = "VBG"
                elif "n" in p:
                    tags[i] = "NNS" if self.plural(w) else "NN"
                elif "a" in p:
                    tags[i] = "JJ"
                elif "v" in p:
                    tags[i] = "VBG" if self.gerund(w) else "VBD" if w.endswith("ed") else "VB"
                elif "r" in p:
                    tags[i] = "RB"
                else:
                    tags[i] = self.unknown(w, orig)
        return list(zip(tokens, tags))


class BuiltinLexiconTagger(_LexiconTagger):
    """No data at all: the synthetic world's vocabulary plus suffix rules (``-ly`` adverb, ``-ing`` /
    ``-ed`` verb, ``-s`` plural noun, other lower-case words nouns). Enough for the synthetic captions;
    rough on real English."""

    name = "lexicon"

    def __init__(self, nouns=_BUILTIN_NOUNS, adjectives=_BUILTIN_ADJS):
        self.nouns = set(nouns.split() if isinstance(nouns, str) else nouns)
        self.adjs = set(adjectives.split() if isinstance(adjectives, str) else adjectives)

    def _singular(self, w):
        for suf, rep in (("ies", "y"), ("ches", "ch"), ("shes", "sh"), ("xes", "x"), ("ses", "s"), ("s", "")):
            if w.endswith(suf) and len(w) > len(suf) + 1:
                return w[: -len(suf)] + rep
        return w

    def pos(self, w):
        if w in self.adjs:
            return {"a"} | ({"n"} if w in self.nouns else set())
        if w in self.nouns or self._singular(w) in self.nouns:
            return {"n"}
        if w.endswith("ly"):
            return {"r"}
        if w.endswith(("ing", "ed")):
            return {"v"}
        if w.endswith(("ful", "ous", "ive", "able", "ible", "ish", "less", "ic")):
            return {"a"}
        return {"n"}

    def plural(self, w):
        return w not in self.nouns and self._singular(w) != w

    def gerund(self, w):
        return w.endswith("ing") and len(w) > 5 and w not in self.nouns


class WordNetTagger(_LexiconTagger):
    """WordNet lexicon filter: the parts of speech WordNet lists for a word (``morphy`` for inflections);
    words WordNet does not know are dropped (tag ``FW``) unless capitalised (``NNP``)."""

    name = "wordnet"

    def __init__(self, wordnet):
        self.wn = wordnet
        self.pos = lru_cache(maxsize=65536)(self._pos)  # per instance: the cache dies with the tagger

    def _pos(self, w):
        wn = self.wn
        return {
            p for p, tag in (("n", wn.NOUN), ("a", wn.ADJ), ("v", wn.VERB), ("r", wn.ADV)) if wn.synsets(w, pos=tag)
        }

    def plural(self, w):
        base = self.wn.morphy(w, self.wn.NOUN)
        return base is not None and base != w

    def gerund(self, w):
        base = self.wn.morphy(w, self.wn.VERB)
        return w.endswith("ing") and base is not None and base != w


# WordNet's lexicographer file names (lexnames(5WN)); NLTK's reader needs this file, Debian omits it.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
    "adj.ppl"
).split()


_LEX_POS = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}


SYSTEM_WORDNET = Path("/usr/share/wordnet")


def private_nltk_data() -> Path:
    """``cache_dir()/nltk_data``: where a system WordNet is copied so NLTK can read it."""
    return paths.cache_dir() / "nltk_data"


def install_system_wordnet(src: str | Path = SYSTEM_WORDNET, dest: str | Path | None = None) -> Path | None:
    """Copy a WordNet 3.0 database (Debian ``wordnet-base`` puts it in ``/usr/share/wordnet``) to
    ``<dest>/corpora/wordnet`` (default: :func:`private_nltk_data`), adding the ``lexnames`` file NLTK needs.
    Returns the corpus folder, or None when ``src`` has no WordNet."""
    src = Path(src)
    if not (src / "index.noun").is_file() or not (src / "data.noun").is_file():
        return None
    out = Path(dest or private_nltk_data()) / "corpora" / "wordnet"
    if (out / "lexnames").is_file() and (out / "data.noun").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    lines = [f"{i:02d}\t{n}\t{_LEX_POS[n.split('.')[0]]}" for i, n in enumerate(_LEXNAMES)]
    (tmp / "lexnames").write_text("\n".join(lines) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _wordnet_reader(root: Path):
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _Reader(WordNetCorpusReader):
        def map_wn(self, version="oewn"):  # no index.sense needed: only loses multilingual mapping
            return None

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _Reader(str(root), None)


@lru_cache(maxsize=1)
def load_wordnet():
    """NLTK's WordNet reader from NLTK's data path, else from a system WordNet copied into the private data
    dir; None when neither exists."""
    try:
        from nltk.corpus import wordnet as wn

        wn.ensure_loaded()
        wn.synsets("dog")
        return wn
    except (LookupError, ImportError, OSError):
        pass
    import nltk

    data_dir = str(private_nltk_data())
    if data_dir not in nltk.data.path:  # NLTK only reads corpora below its data path
        nltk.data.path.append(data_dir)
    for root in (private_nltk_data() / "corpora" / "wordnet", None):
        if root is None:
            root = install_system_wordnet()
            if root is None:
                return None
        if (root / "lexnames").is_file():
            try:
                wn = _wordnet_reader(root)
                wn.synsets("dog")
                return wn
            except Exception as e:  # a broken copy: log and keep falling back
                log.info("WordNet at %s unusable: %s", root, e)
    return None


@lru_cache(maxsize=None)
def get_tagger(kind: str = "auto") -> Tagger:
    """The part-of-speech tagger: ``"auto"`` tries ``"perceptron"``, ``"wordnet"``, ``"lexicon"`` in turn;
    a named kind raises ``LookupError`` when its data is missing. The choice is logged."""
    if kind not in ("auto", "perceptron", "wordnet", "lexicon"):
        raise ValueError(f"tagger kind must be auto|perceptron|wordnet|lexicon, got {kind!r}")
    if kind in ("auto", "perceptron"):
        try:
            t = PerceptronTagger()
            log.info("caption labels: using NLTK's averaged perceptron tagger")
            return t
        except (LookupError, ImportError, OSError) as e:
            if kind == "perceptron":
                raise LookupError(
                    "NLTK's perceptron tagger data (averaged_perceptron_tagger_eng) is missing: "
                    "nltk.download('averaged_perceptron_tagger_eng')"
                ) from e
    if kind in ("auto", "wordnet"):
        wn = load_wordnet()
        if wn is not None:
            log.info("caption labels: perceptron tagger data missing; using the WordNet lexicon filter")
            return WordNetTagger(wn)
        if kind == "wordnet":
            raise LookupError(
                f"no WordNet: nltk.download('wordnet') or apt-get install wordnet-base ({SYSTEM_WORDNET})"
            )
    log.info("caption labels: no tagger data; using the built-in lexicon tagger (synthetic-world vocabulary)")
    return BuiltinLexiconTagger()


def _tagger(tagger) -> Tagger:
    if tagger is None or isinstance(tagger, str):
        return get_tagger(tagger or "auto")
    if not callable(tagger):
        raise TypeError(f"tagger must be a callable tokens -> [(word, tag)] or a kind name, got {tagger!r}")
    return tagger


# ============================================================================================== extraction
def tag(caption: str, tagger=None) -> list[tuple[str, str]]:
    """``[(word, Penn tag)]`` of a caption."""
    return _tagger(tagger)(tokenize(caption))


def _dedupe(words):
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def extract_nouns(caption: str, tagger=None, verbs: bool = False) -> list[str]:
    """Distinct lower-case nouns (``NN``, ``NNS``, ``NNP``; plus the reference's verb tags when ``verbs``)
    in caption order."""
    keep = NOUN_TAGS + (VERB_TAGS if verbs else ())
    return _dedupe(w.lower() for w, t in tag(caption, tagger) if t in keep and re.search(r"[A-Za-z]", w))


@lru_cache(maxsize=8)
def _parser(grammar: str):
    import nltk

    return nltk.RegexpParser(grammar)


def extract_noun_phrases(caption: str, tagger=None, grammar: str = NP_GRAMMAR, min_words: int = 2) -> list[str]:
    """Distinct lower-case noun phrases (chunks of ``grammar``, default adjectives + nouns) with at least
    ``min_words`` words, in caption order (single nouns come from :func:`extract_nouns`)."""
    tree = _parser(grammar).parse(tag(caption, tagger))
    out = []
    for sub in tree.subtrees(lambda s: s.label() == "NP"):
        words = [w.lower() for w, _ in sub.leaves()]
        if len(words) >= min_words:
            out.append(" ".join(words))
    return _dedupe(out)


def candidates(caption: str, kind: str = "nouns", tagger=None, verbs: bool = False) -> list[str]:
    """The label pool of one caption: ``"nouns"``, ``"np"`` (noun phrases) or ``"np+nouns"`` (both)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    t = _tagger(tagger)
    out = []
    if kind in ("np", "np+nouns"):
        out += extract_noun_phrases(caption, t)
    if kind in ("nouns", "np+nouns"):
        out += extract_nouns(caption, t, verbs)
    return _dedupe(out)


@dataclass
class Labels:
    """``K`` labels of one caption: ``raw`` label strings (``"<PAD>"`` or the caption for the unfilled slots),
    ``prompts`` (each label in a template; pads stay ``"<PAD>"``), ``pad`` True where the slot is a
    ``<PAD>`` whose embedding must be nulled."""

    raw: list
    prompts: list
    pad: list


def extract_labels(
    caption: str,
    k: int = 3,
    kind: str = "nouns",
    pad: str = "pad",
    tagger=None,
    templates=TEMPLATES,
    rng: random.Random | None = None,
    vocabulary=None,
    verbs: bool = False,
) -> Labels:
    """Up to ``k`` labels of ``caption`` for the multi-label loss (thesis Eq 24-26).

    Candidates from :func:`candidates` (``kind``); with ``vocabulary`` (a curated set, section 5.7.1) those
    in it come first and the others fill up; ``rng`` samples ``k`` of them (None: the first ``k`` in
    order, and the first template: deterministic). Missing slots: ``pad="repeat"`` puts the caption
    (GroupViT's original behaviour), ``pad="pad"`` a ``<PAD>`` label with ``pad`` True (the thesis's
    refinement)."""
    return labels_from_candidates(caption, candidates(caption, kind, tagger, verbs), k, pad, templates, rng, vocabulary)


def labels_from_candidates(
    caption: str,
    pool: list,
    k: int = 3,
    pad: str = "pad",
    templates=TEMPLATES,
    rng: random.Random | None = None,
    vocabulary=None,
) -> Labels:
    """:func:`extract_labels` from an already extracted candidate ``pool`` (training caches the pools)."""
    if pad not in ("pad", "repeat"):
        raise ValueError(f"pad must be 'pad' or 'repeat', got {pad!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    pool = list(pool)
    if vocabulary is not None:
        vocab = set(vocabulary)
        first = [w for w in pool if w in vocab]
        rest = [w for w in pool if w not in vocab]
        if rng is not None:
            rng.shuffle(first)
            rng.shuffle(rest)
        chosen = (first + rest)[:k]
    elif rng is not None:
        chosen = rng.sample(pool, min(k, len(pool)))
    else:
        chosen = pool[:k]
    raw, prompts, mask = [], [], []
    for w in chosen:
        raw.append(w)
        prompts.append((rng.choice(templates) if rng is not None else templates[0]).format(w))
        mask.append(False)
    while len(raw) < k:
        if pad == "repeat":
            raw.append(caption)
            prompts.append(caption)
            mask.append(False)
        else:
            raw.append(PAD)
            prompts.append(PAD)
            mask.append(True)
    return Labels(raw, prompts, mask)


# ============================================================================================== curation
def label_frequencies(captions, kind: str = "nouns", tagger=None) -> Counter:
    """How many captions mention each label (counted once per caption) over a corpus."""
    t = _tagger(tagger)
    c = Counter()
    for cap in captions:
        c.update(candidates(cap, kind, t))
    return c


def curated_vocabulary(frequencies: Counter, min_count: int = 1000) -> set[str]:
    """Labels seen at least ``min_count`` times (the thesis's ``Entity_freq >= 1K / 5K`` sets, Table 10)."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    return {w for w, n in frequencies.items() if n >= min_count}
