"""Contamination audit: does a DAP corpus contain an end task's texts? In das6 it may well: ChemProt sentences
come from PubMed abstracts, SciERC's from AI papers, ACL-ARC's from ACL papers.

A text is *overlapping* a corpus when it shares at least one 13-gram with one of the corpus's texts (tokens split
on white space and lower-cased; 13 as in GPT-3's contamination study, Brown et al. 2020, Appendix C), and an
*exact duplicate* when it equals one of them after the same normalisation. A text shorter than 13 tokens has
no 13-gram: only an exact duplicate can flag it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator

from cpt_bench.common.atomic import write_json_atomic
from cpt_bench.common.cache import cache_dir
from cpt_bench.data.corpus import Corpus, json_digest

NGRAM = 13
WARN_ABOVE = 0.01  # a run warns when more than this fraction of a test split overlaps a corpus


def tokens(text: str) -> list[str]:
    return text.lower().split()


def ngrams(text: str, n: int = NGRAM) -> Iterator[tuple[str, ...]]:
    words = tokens(text)
    return (tuple(words[i: i + n]) for i in range(len(words) - n + 1))


@dataclasses.dataclass
class SplitOverlap:
    """One (DAP corpus, end-task split) pair of the audit."""

    corpus: str
    task: str
    split: str
    texts: int
    overlapping: int  # texts that share at least one 13-gram with the corpus
    exact_duplicates: int  # texts equal to a corpus text (normalised)

    @property
    def fraction(self) -> float:
        return self.overlapping / self.texts if self.texts else 0.0


class EndTaskIndex:
    """The 13-grams and normalised texts of end-task splits, each pointing back at its (task, split, text)."""

    def __init__(self, splits: dict[tuple[str, str], list[str]]):
        self.splits = splits
        self.ngrams: dict[tuple[str, ...], set[tuple[str, str, int]]] = {}
        self.texts: dict[str, set[tuple[str, str, int]]] = {}
        for (task, split), texts in splits.items():
            for index, text in enumerate(texts):
                where = (task, split, index)
                self.texts.setdefault(" ".join(tokens(text)), set()).add(where)
                for gram in ngrams(text):
                    self.ngrams.setdefault(gram, set()).add(where)

    def hits(self, corpus_text: str) -> tuple[set[tuple[str, str, int]], set[tuple[str, str, int]]]:
        """The end-task texts this corpus text shares a 13-gram with, and those it duplicates exactly."""
        shared: set[tuple[str, str, int]] = set()
        for gram in ngrams(corpus_text):
            found = self.ngrams.get(gram)
            if found:
                shared |= found
        return shared, self.texts.get(" ".join(tokens(corpus_text)), set())


def cached_audit(corpora: dict[str, Iterable[str]], splits: dict[tuple[str, str], list[str]]) -> list[SplitOverlap]:
    """`audit`, kept in the cache per content of the corpora and splits: every run records it, and on
    paper-sized corpora it takes minutes. Corpora (lists or `data.corpus.Corpus`) are streamed, also for the
    cache key."""
    content = [NGRAM, sorted(corpora.items(), key=lambda item: item[0]),
               sorted([list(k), v] for k, v in splits.items())]
    path = cache_dir() / "audit" / f"{json_digest(content)[:20]}.json"
    if path.is_file():
        try:
            return [SplitOverlap(**row) for row in json.loads(path.read_text())]
        except (OSError, ValueError, TypeError):
            pass  # a damaged entry is made again
    rows = audit(corpora, splits)
    write_json_atomic(path, [dataclasses.asdict(r) for r in rows])
    return rows


def audit(corpora: dict[str, Iterable[str]], splits: dict[tuple[str, str], list[str]]) -> list[SplitOverlap]:
    """Every (corpus, split) pair: how many of the split's texts overlap the corpus, how many it duplicates."""
    index = EndTaskIndex(splits)
    rows = []
    for corpus, corpus_texts in corpora.items():
        shared: set[tuple[str, str, int]] = set()
        duplicated: set[tuple[str, str, int]] = set()
        for text in corpus_texts:
            grams, same = index.hits(text)
            shared |= grams
            duplicated |= same
        for (task, split), texts in splits.items():
            rows.append(SplitOverlap(corpus, task, split, len(texts),
                                     sum(1 for t, s, _ in shared if (t, s) == (task, split)),
                                     sum(1 for t, s, _ in duplicated if (t, s) == (task, split))))
    return rows


def decontaminate(corpus: Corpus | list[str], test_texts: Iterable[str]) -> tuple[Corpus, int]:
    """The corpus without every text that shares a 13-gram with a test text; how many went. (A short exact
    duplicate stays: below 13 tokens a match may be a common phrase; the audit counts such duplicates.) One
    streaming pass; the result is a view that leaves those positions out."""
    corpus = corpus if isinstance(corpus, Corpus) else Corpus.of(corpus, "texts")
    index = EndTaskIndex({("test", "test"): list(test_texts)})
    dropped = frozenset(position for position, text in corpus.positions() if index.hits(text)[0])
    return corpus.view(dropped=dropped), len(dropped)


def table(rows: list[SplitOverlap]) -> str:
    """The audit as a markdown table."""
    from tabulate import tabulate

    return tabulate([[r.corpus, r.task, r.split, r.texts, r.overlapping, f"{r.fraction:.1%}", r.exact_duplicates]
                     for r in rows],
                    headers=["DAP corpus", "end task", "split", "texts", f"share a {NGRAM}-gram", "fraction",
                             "exact duplicates"], tablefmt="github")


def warnings(rows: list[SplitOverlap]) -> list[str]:
    """One line per test split with more than WARN_ABOVE of its texts overlapping a corpus."""
    return [f"warning: {r.overlapping} of {r.texts} test texts of end task {r.task} ({r.fraction:.1%}) share a "
            f"{NGRAM}-gram with the DAP corpus of {r.corpus} (--set data.decontaminate=true drops such corpus texts)"
            for r in rows if r.split == "test" and r.fraction > WARN_ABOVE]
