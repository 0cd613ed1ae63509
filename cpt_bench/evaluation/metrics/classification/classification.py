"""Macro-F1 (or micro-F1) and accuracy over integer class labels, as an `evaluate` metric module.

Shipped inside cpt-bench and loaded by path, so scoring works offline (evaluate.load("f1") needs the hub).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1 averaged over classes (macro by default, classes = the task's label set) and accuracy."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list[int]): predicted class ids.
    references (list[int]): gold class ids.
    num_labels (int, optional): size of the label set; classes absent from both lists count with F1 = 0
        only when given (as scikit-learn does with `labels=range(num_labels)`). Default: the classes seen
        in either list (scikit-learn's default; what cpt-bench scores with).
    average (str): "macro" (default) or "micro".
Returns:
    f1 (float), accuracy (float)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_labels=None, average="macro"):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        accuracy = float((predictions == references).mean()) if len(references) else 0.0
        if average == "micro":
            # single-label classification: micro-F1 over all classes equals accuracy
            return {"f1": accuracy, "accuracy": accuracy}
        if average != "macro":
            raise ValueError(f"average must be 'macro' or 'micro', got {average!r}")
        classes = np.arange(num_labels) if num_labels else np.union1d(predictions, references)
        scores = []
        for c in classes:
            true_positive = np.sum((predictions == c) & (references == c))
            predicted = np.sum(predictions == c)
            actual = np.sum(references == c)
            denominator = predicted + actual
            scores.append(2.0 * true_positive / denominator if denominator else 0.0)
        return {"f1": float(np.mean(scores)) if scores else 0.0, "accuracy": accuracy}
