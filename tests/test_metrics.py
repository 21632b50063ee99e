"""Metrics through the repo's offline `evaluate` module agree with scikit-learn."""

import numpy as np
import pytest
from sklearn import metrics as skm

from lib import metrics

LABELS = ["a", "b", "c", "d"]
CASES = [
    ([0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2, 3]),  # perfect
    ([0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 1, 2, 2, 3, 3, 0]),  # half right
    ([0, 0, 0, 1, 1, 2, 3, 3, 3, 3], [0, 0, 1, 1, 1, 0, 3, 3, 0, 3]),  # class 2 never predicted
    ([1, 1, 1, 1], [1, 1, 0, 1]),  # classes 2 and 3 absent
]


@pytest.mark.parametrize("y_true,y_pred", CASES)
def test_metrics_equal_sklearn(y_true, y_pred):
    got = metrics.classification_metrics(np.array(y_true), np.array(y_pred), LABELS)
    ids = list(range(len(LABELS)))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    for how in ("weighted", "macro"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=ids, average=how, zero_division=0)
        assert got[f"precision_{how}"] == pytest.approx(p)
        assert got[f"recall_{how}"] == pytest.approx(r)
        assert got[f"f1_{how}"] == pytest.approx(f)
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=ids, average=None, zero_division=0)
    for i, name in enumerate(LABELS):
        assert got["per_class"][name] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]})
    assert got["n_test"] == len(y_true)


def test_confusion_matrix_equals_sklearn():
    y_true, y_pred = CASES[2]
    np.testing.assert_array_equal(
        metrics.confusion_matrix(y_true, y_pred, 4), skm.confusion_matrix(y_true, y_pred, labels=range(4))
    )


def test_metric_module_loads_offline_through_evaluate():
    module = metrics.load_metric("f1")
    assert module.compute(predictions=[0, 1, 1], references=[0, 1, 0], average="macro")["f1"] == pytest.approx(
        skm.f1_score([0, 1, 0], [0, 1, 1], average="macro")
    )


def test_most_confident_mistakes_order():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.95, 0.05]])
    refs = np.array([0, 0, 0, 1])
    assert metrics.most_confident_mistakes(probs, refs, 5).tolist() == [3, 1, 2]
    assert metrics.most_confident_mistakes(probs, refs, 1).tolist() == [3]


def test_update_metrics_merges(tmp_path):
    path = tmp_path / "metrics.json"
    metrics.update_metrics(path, {"accuracy": 0.5})
    merged = metrics.update_metrics(path, {"export": {"agreement": 1.0}})
    assert merged == {"accuracy": 0.5, "export": {"agreement": 1.0}}
