"""A deterministic corpus of real English sentences from a source bundled with Python itself.

The source is :data:`pydoc_data.topics.topics`: the help texts of the *Python Language
Reference* that ``help("assert")`` and friends print, shipped in every CPython installation
(standard library module ``pydoc_data.topics``, no download, no third-party package). The prose
is technical English written by people (statements, data model, exceptions, ...).

Extraction, all deterministic:

1. topics in sorted key order; each topic split into paragraphs at blank lines;
2. each paragraph is dedented (definition bodies are indented prose); it is dropped as code or
   grammar when a line is still indented (literal blocks, nested code), has ``::=`` or ``>>>``,
   is a section underline (``****``, ``====``, ``----``) or a bullet or numbered list item;
3. each prose paragraph's lines are joined and split into sentences after ``.``, ``!`` or ``?``
   followed by whitespace and an upper-case letter, a digit or a quote (not after "e.g." and
   "i.e.");
4. a sentence is kept when it has ``min_words..max_words`` words (default 6..60), starts with an
   upper-case letter or a quote, ends with ``.``, ``!`` or ``?``, has balanced parentheses and
   is mostly letters (at least 70 % of its non-space characters);
5. exact duplicates are dropped (first occurrence wins).

The fixed split orders the sentences by the SHA-1 of their UTF-8 text, so a sentence's set does
not depend on any random generator and adding or removing one sentence moves no other. The first
``calibration`` sentences calibrate, the next ``evaluation`` evaluate (disjoint by construction).
The text changes between Python minor versions (the reference manual is edited), so
:class:`TextCorpus` records ``source`` with the Python version and a ``fingerprint`` (SHA-1 of
all sentences) to cite with any number measured on it.

>>> corpus = load_reference_sentences(calibration=64, evaluation=128)
>>> len(corpus.calibration), len(corpus.evaluation)
(64, 128)
>>> set(corpus.calibration).isdisjoint(corpus.evaluation)
True
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import textwrap
from dataclasses import dataclass, field

from slimkit.errors import ConfigError

__all__ = ["TextCorpus", "load_reference_sentences", "reference_sentences", "split_sentences"]

_SENTENCE_END = re.compile(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[.!?])\s+(?=[A-Z0-9\"'])")
_UNDERLINE = re.compile(r"^\s*([*=\-~^\"#+])\1{2,}\s*$")
_LIST_ITEM = re.compile(r"^\s*([*\-+]|\d+\.|[a-z]\))\s")
_ENDINGS = (".", "!", "?")


def _is_prose(lines: list[str]) -> bool:
    for line in textwrap.dedent("\n".join(lines)).splitlines():
        if line[:1].isspace() or "::=" in line or ">>>" in line:
            return False
        if _UNDERLINE.match(line) or _LIST_ITEM.match(line):
            return False
    return True


def split_sentences(text: str) -> list[str]:
    """Sentences of the prose paragraphs in ``text`` (steps 1-3 of the module docstring)."""
    sentences: list[str] = []
    for paragraph in re.split(r"\n[ \t]*\n", text):
        lines = [line for line in paragraph.splitlines() if line.strip()]
        if not lines or not _is_prose(lines):
            continue
        joined = " ".join(line.strip() for line in lines)
        sentences.extend(s.strip() for s in _SENTENCE_END.split(joined) if s.strip())
    return sentences


def _keep(sentence: str, min_words: int, max_words: int) -> bool:
    words = sentence.split()
    if not min_words <= len(words) <= max_words:
        return False
    if not (sentence[0].isupper() or sentence[0] in "\"'") or not sentence.endswith(_ENDINGS):
        return False
    if sentence.count("(") != sentence.count(")"):
        return False
    chars = [c for c in sentence if not c.isspace()]
    return sum(c.isalpha() for c in chars) >= 0.7 * len(chars)


def reference_sentences(min_words: int = 6, max_words: int = 60) -> list[str]:
    """Every kept sentence of the bundled reference manual, deduplicated, in source order."""
    if not 1 <= min_words <= max_words:
        raise ConfigError(
            f"need 1 <= min_words <= max_words, got min_words={min_words}, max_words={max_words}"
        )
    return list(_extract(min_words, max_words))


@functools.lru_cache(maxsize=8)
def _extract(min_words: int, max_words: int) -> tuple[str, ...]:
    from pydoc_data.topics import topics

    seen: set[str] = set()
    kept: list[str] = []
    for key in sorted(topics):
        for sentence in split_sentences(topics[key]):
            if sentence not in seen and _keep(sentence, min_words, max_words):
                seen.add(sentence)
                kept.append(sentence)
    return tuple(kept)


def _digest(sentence: str) -> str:
    return hashlib.sha1(sentence.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TextCorpus:
    """Calibration and evaluation sentences, with where they came from."""

    calibration: tuple[str, ...]
    evaluation: tuple[str, ...]
    source: str
    fingerprint: str
    available: int
    info: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """Everything but the sentences themselves (for result files)."""
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "available": self.available,
            "calibration": len(self.calibration),
            "evaluation": len(self.evaluation),
            **self.info,
        }


def load_reference_sentences(
    calibration: int = 256,
    evaluation: int = 512,
    *,
    min_words: int = 6,
    max_words: int = 60,
) -> TextCorpus:
    """The fixed calibration / evaluation split of :func:`reference_sentences`.

    Raises :class:`ConfigError` when the sizes are not positive or ask for more sentences than
    the corpus has.
    """
    for name, value in (("calibration", calibration), ("evaluation", evaluation)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    sentences = reference_sentences(min_words, max_words)
    if calibration + evaluation > len(sentences):
        raise ConfigError(
            f"asked for {calibration} calibration + {evaluation} evaluation sentences, the "
            f"corpus has {len(sentences)} (words {min_words}..{max_words})"
        )
    ordered = sorted(sentences, key=_digest)
    version = ".".join(map(str, sys.version_info[:2]))
    fingerprint = hashlib.sha1("\n".join(sentences).encode("utf-8")).hexdigest()
    return TextCorpus(
        calibration=tuple(ordered[:calibration]),
        evaluation=tuple(ordered[calibration : calibration + evaluation]),
        source=f"pydoc_data.topics (Python {version} language reference help texts)",
        fingerprint=fingerprint,
        available=len(sentences),
        info={"min_words": min_words, "max_words": max_words},
    )
