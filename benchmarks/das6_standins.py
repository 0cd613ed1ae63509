"""A six-domain, das6-shaped data folder from the three real domains of das6-mini, for checking that das6-lite's
defaults hold on data of other sizes and shapes when the real ai, phone and camera data are not on the machine:

    python benchmarks/das6_standins.py ../shared/data/das6-mini OUT_DIR

restaurant, acl and pubmed keep their real text; ai, phone and camera are STAND-INS, not the real domains: real
text of das6-mini reshaped to what das6 publishes for those domains (Ke et al. 2023, Table 6; camera's and
phone's train sizes as issue 34 measured them on the full das6): the number of classes, the train and test
sizes, no dev split, an aspect field for the two review tasks.

- ai: 7 classes, 3,219 train and 568 test examples (das6: 974; what those classes leave) from pubmed's
  ChemProt train, its 7 most frequent relations renamed to SciERC's labels; corpus: acl's unlabeled texts from
  the 14,000th on;
- phone: 2 classes, 337 train and 553 test examples, from restaurant's SemEval train (positive and negative
  only); corpus: restaurant's unlabeled texts from the 17,000th on;
- camera: 2 classes, 286 train and 626 test examples, from restaurant's SemEval train (others than phone's);
  corpus: restaurant's unlabeled texts 14,000 to 16,999.

Every example and corpus text is used by one domain only: restaurant keeps the train examples the stand-ins do
not take and its first 14,000 unlabeled texts, acl its first 14,000, and pubmed's end task becomes its ChemProt
dev split (train) and test split (test), since ai takes its train split. Deterministic (seeded) and idempotent.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
from pathlib import Path

SCIERC_LABELS = ["COMPARE", "CONJUNCTION", "EVALUATE-FOR", "FEATURE-OF", "HYPONYM-OF", "PART-OF", "USED-FOR"]
SIZES = {"ai": (3219, 974), "phone": (337, 553), "camera": (286, 626)}  # (train, test)
CORPUS_SPLIT = 14_000  # restaurant's and acl's unlabeled texts kept for themselves; the rest go to stand-ins


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def build(mini: Path, out: Path, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write the six domains under `out`; returns {domain: {split: examples}}."""
    rng = random.Random(seed)
    sizes: dict[str, dict[str, int]] = {}

    def emit(domain: str, splits: dict[str, list[dict]]) -> None:
        for split, rows in splits.items():
            write(out / domain / f"{split}.jsonl", rows)
        sizes[domain] = {split: len(rows) for split, rows in splits.items()}

    # the review tasks: restaurant's polar train examples, shuffled, cut into phone's, camera's and the rest
    restaurant_train = read(mini / "restaurant" / "train.jsonl")
    polar = [i for i, row in enumerate(restaurant_train) if row["label"] in ("positive", "negative")]
    rng.shuffle(polar)
    taken: set[int] = set()
    reviews_unlabeled = read(mini / "restaurant" / "unlabeled.jsonl")
    corpus_ranges = {"camera": (CORPUS_SPLIT, 17_000), "phone": (17_000, len(reviews_unlabeled))}
    for domain in ("phone", "camera"):
        train_size, test_size = SIZES[domain]
        rows = polar[len(taken): len(taken) + train_size + test_size]
        taken.update(rows)
        examples = [restaurant_train[i] for i in rows]
        start, end = corpus_ranges[domain]
        emit(domain, {"train": examples[:train_size], "test": examples[train_size:],
                      "unlabeled": reviews_unlabeled[start:end]})
    emit("restaurant", {"train": [row for i, row in enumerate(restaurant_train) if i not in taken],
                        "test": read(mini / "restaurant" / "test.jsonl"),
                        "unlabeled": reviews_unlabeled[:CORPUS_SPLIT]})

    # the relation task: ChemProt's 7 most frequent relations, renamed; pubmed keeps its dev and test splits
    chemprot = read(mini / "pubmed" / "train.jsonl")
    frequent = [label for label, _ in collections.Counter(r["label"] for r in chemprot).most_common(7)]
    renamed = dict(zip(sorted(frequent), SCIERC_LABELS))
    relations = [{**row, "label": renamed[row["label"]]} for row in chemprot if row["label"] in renamed]
    rng.shuffle(relations)
    train_size, test_size = SIZES["ai"]
    papers_unlabeled = read(mini / "acl" / "unlabeled.jsonl")
    emit("ai", {"train": relations[:train_size], "test": relations[train_size: train_size + test_size],
                "unlabeled": papers_unlabeled[CORPUS_SPLIT:]})
    emit("pubmed", {"train": read(mini / "pubmed" / "dev.jsonl"), "test": read(mini / "pubmed" / "test.jsonl"),
                    "unlabeled": read(mini / "pubmed" / "unlabeled.jsonl")})
    emit("acl", {split: read(mini / "acl" / f"{split}.jsonl") for split in ("train", "dev", "test")}
         | {"unlabeled": papers_unlabeled[:CORPUS_SPLIT]})
    (out / "STANDINS.md").write_text(
        "# A das6-shaped folder built by benchmarks/das6_standins.py from das6-mini\n\n"
        "ai, phone and camera are stand-ins (real das6-mini text reshaped to those domains' published sizes),"
        " not the real domains. Examples per split:\n\n"
        + "".join(f"- {domain}: {json.dumps(counts)}\n" for domain, counts in sorted(sizes.items())),
        encoding="utf-8")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mini", type=Path, help="das6-mini (restaurant, acl, pubmed)")
    parser.add_argument("out", type=Path, help="the folder to write the six domains into")
    args = parser.parse_args()
    for domain, counts in sorted(build(args.mini, args.out).items()):
        print(f"{domain:<11} {counts}")


if __name__ == "__main__":
    main()
