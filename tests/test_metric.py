"""The shipped classification metric (evaluator.score) agrees with scikit-learn, offline."""

from __future__ import annotations

import random

import pytest

from cpt_bench.evaluation.evaluator import score

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _sklearn(predictions, references, num_labels):
    # scikit-learn's default label set: the classes that occur in either list (what the paper scored with)
    return {
        "macro_f1": sklearn_metrics.f1_score(references, predictions, average="macro", zero_division=0),
        "micro_f1": sklearn_metrics.f1_score(references, predictions, average="micro", zero_division=0),
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
    # class 3 appears in neither list (it does not count); class 2 is never predicted
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


def test_class_absent_from_both_lists_does_not_count():
    # perfect on classes 0 and 1; class 2 never occurs in the split nor the predictions: macro-F1 is 1
    got = score([0, 1, 1, 0], [0, 1, 1, 0], 3, "macro")
    assert got == {"macro_f1": 1.0, "accuracy": 1.0}


def test_class_never_predicted_lowers_macro_f1():
    # class 2 occurs in the references but is never predicted: it counts with F1 = 0
    got = score([0, 1, 0, 1], [0, 1, 2, 2], 3, "macro")
    assert got["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_class_id_outside_label_set_is_rejected():
    with pytest.raises(ValueError, match="labels"):
        score([0, 3], [0, 1], 2)


@pytest.mark.parametrize("predictions, references, num_labels", _cases())
def test_micro_f1_matches_sklearn(predictions, references, num_labels):
    got = score(predictions, references, num_labels, "micro")
    expected = _sklearn(predictions, references, num_labels)
    assert got["macro_f1"] == pytest.approx(expected["micro_f1"], abs=1e-12)
    assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)


def test_unknown_average_is_rejected():
    with pytest.raises(Exception, match="average"):
        score([0, 1], [0, 1], 2, "weighted")
