"""The shipped classification metric (evaluator.score) agrees with scikit-learn, offline."""

from __future__ import annotations

import random

import pytest

from cpt_bench.evaluator import score

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _sklearn(predictions, references, num_labels):
    labels = list(range(num_labels))
    return {
        "macro_f1": sklearn_metrics.f1_score(references, predictions, labels=labels, average="macro",
                                             zero_division=0),
        "micro_f1": sklearn_metrics.f1_score(references, predictions, labels=labels, average="micro",
                                             zero_division=0),
        "accuracy": sklearn_metrics.accuracy_score(references, predictions),
    }


def _cases():
    rng = random.Random(0)
    cases = []
    for num_labels, size in [(2, 10), (3, 50), (5, 200), (7, 33), (4, 1)]:
        references = [rng.randrange(num_labels) for _ in range(size)]
        predictions = [rng.randrange(num_labels) for _ in range(size)]
        cases.append((predictions, references, num_labels))
    # class 2 is in the references but never predicted
    cases.append(([0, 1, 1, 0, 1, 0], [0, 1, 2, 2, 1, 0], 3))
    # class 3 appears in neither list (it still counts, with F1 = 0); class 2 is never predicted
    cases.append(([0, 1, 0, 1, 1, 0, 0], [0, 1, 2, 1, 0, 2, 0], 4))
    # a class predicted but never in the references
    cases.append(([2, 2, 0, 1], [0, 1, 0, 1], 3))
    # all correct, one class absent
    cases.append(([0, 1, 1, 0], [0, 1, 1, 0], 3))
    # all wrong
    cases.append(([1, 0, 1], [0, 1, 0], 2))
    return cases


@pytest.mark.parametrize("predictions, references, num_labels", _cases())
def test_macro_f1_and_accuracy_match_sklearn(predictions, references, num_labels):
    got = score(predictions, references, num_labels, "macro")
    assert set(got) == {"macro_f1", "accuracy"}
    assert all(isinstance(v, float) for v in got.values())
    expected = _sklearn(predictions, references, num_labels)
    assert got["macro_f1"] == pytest.approx(expected["macro_f1"], abs=1e-12)
    assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)


def test_default_average_is_macro():
    predictions, references = [0, 1, 1, 0, 1, 0], [0, 1, 2, 2, 1, 0]
    assert score(predictions, references, 3) == score(predictions, references, 3, "macro")


def test_absent_class_lowers_macro_f1():
    # perfect on classes 0 and 1; class 2 never occurs: macro over 3 classes is 2/3, not 1
    got = score([0, 1, 1, 0], [0, 1, 1, 0], 3, "macro")
    assert got["accuracy"] == 1.0
    assert got["macro_f1"] == pytest.approx(2 / 3)
    assert score([0, 1, 1, 0], [0, 1, 1, 0], 2, "macro")["macro_f1"] == 1.0


@pytest.mark.parametrize("predictions, references, num_labels", _cases())
def test_micro_f1_matches_sklearn(predictions, references, num_labels):
    got = score(predictions, references, num_labels, "micro")
    expected = _sklearn(predictions, references, num_labels)
    assert got["macro_f1"] == pytest.approx(expected["micro_f1"], abs=1e-12)
    assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)


def test_unknown_average_is_rejected():
    with pytest.raises(Exception, match="average"):
        score([0, 1], [0, 1], 2, "weighted")
