"""The bundled reference-manual sentence corpus: extraction rules, determinism, fixed split."""

from __future__ import annotations

import doctest
import hashlib

import pytest

from slimkit.errors import ConfigError
from slimkit.tasks import text
from slimkit.tasks.text import load_reference_sentences, reference_sentences, split_sentences

SAMPLE = """\
The "assert" statement
**********************

Assert statements are a convenient way to insert debugging assertions
into a program.  The simple form is shown below, e.g. Like this.

   assert_stmt ::= "assert" expression ["," expression]

   if __debug__:
       if not expression: raise AssertionError

object.__del__(self)

   Called when the instance is about to be destroyed.  This is also
   called a finalizer.

* A bullet item that is not a sentence of prose here.
"""


def test_split_keeps_prose_and_drops_code_grammar_headings_and_lists():
    assert split_sentences(SAMPLE) == [  # the heading goes with its underline
        "Assert statements are a convenient way to insert debugging assertions into a program.",
        "The simple form is shown below, e.g. Like this.",  # no split after "e.g."
        "object.__del__(self)",  # kept here, dropped later by the word filter
        "Called when the instance is about to be destroyed.",  # dedented definition body
        "This is also called a finalizer.",
    ]


def test_corpus_sentences_obey_the_documented_filters():
    sentences = reference_sentences()
    assert len(sentences) > 1500
    assert len(set(sentences)) == len(sentences)
    for sentence in sentences:
        assert 6 <= len(sentence.split()) <= 60, sentence
        assert sentence.endswith((".", "!", "?")) and sentence.count("(") == sentence.count(")")
    narrow = reference_sentences(min_words=10, max_words=12)
    assert narrow and all(10 <= len(s.split()) <= 12 for s in narrow)
    assert set(narrow) <= set(sentences)


def test_split_is_deterministic_disjoint_and_ordered_by_hash():
    corpus = load_reference_sentences(calibration=64, evaluation=128)
    again = load_reference_sentences(calibration=64, evaluation=128)
    assert corpus == again and corpus.fingerprint == again.fingerprint
    assert set(corpus.calibration).isdisjoint(corpus.evaluation)
    both = corpus.calibration + corpus.evaluation
    digests = [hashlib.sha1(s.encode()).hexdigest() for s in both]
    assert digests == sorted(digests)
    # growing one set keeps the other's sentences and order (prefix property)
    bigger = load_reference_sentences(calibration=64, evaluation=256)
    assert bigger.calibration == corpus.calibration
    assert bigger.evaluation[:128] == corpus.evaluation
    info = corpus.to_dict()
    assert info["calibration"] == 64 and info["evaluation"] == 128
    assert info["available"] == len(reference_sentences()) and "pydoc_data" in info["source"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"calibration": 0}, "calibration must be a positive int"),
        ({"evaluation": True}, "evaluation must be a positive int"),
        ({"calibration": 10**6}, "the corpus has"),
        ({"min_words": 9, "max_words": 3}, "min_words <= max_words"),
    ],
)
def test_bad_sizes_are_one_line_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as exc:
        load_reference_sentences(**kwargs)
    assert "\n" not in str(exc.value)


def test_docstring_examples():
    assert doctest.testmod(text).failed == 0
