"""classification_metrics on hand-computed examples; write_json's on-disk form."""

import json
import stat

import pytest

from pipeline.errors import DataError
from pipeline.metrics import classification_metrics, write_json

Y_TRUE = [0, 0, 1, 1, 2, 2]
Y_PRED = [0, 1, 1, 1, 2, 0]
# class a: P 1/2 R 1/2 F1 1/2; b: P 2/3 R 1 F1 4/5; c: P 1 R 1/2 F1 2/3


def test_hand_computed_example():
    m = classification_metrics(Y_TRUE, Y_PRED, ["a", "b", "c"])
    assert m["n"] == 6 and m["accuracy"] == 0.666667
    assert m["precision_macro"] == round((1 / 2 + 2 / 3 + 1) / 3, 6)
    assert m["recall_macro"] == 0.666667
    assert m["f1_macro"] == round((1 / 2 + 4 / 5 + 2 / 3) / 3, 6)
    assert m["f1_weighted"] == m["f1_macro"]  # equal supports
    assert m["per_class"]["b"] == {"precision": 0.666667, "recall": 1.0, "f1": 0.8, "support": 2}
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["class_names"] == ["a", "b", "c"]
    assert json.loads(json.dumps(m)) == m


def test_confusion_rows_are_true_columns_predicted():
    assert classification_metrics([0, 0], [1, 1], ["x", "y"])["confusion_matrix"] == [
        [0, 2],
        [0, 0],
    ]


def test_absent_class_is_listed_with_zeros():
    m = classification_metrics(Y_TRUE, Y_PRED, ["a", "b", "c", "d"])
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert len(m["confusion_matrix"]) == 4 and m["confusion_matrix"][3] == [0, 0, 0, 0]
    assert m["f1_macro"] == round((1 / 2 + 4 / 5 + 2 / 3 + 0) / 4, 6)


def test_label_outside_class_names():
    with pytest.raises(DataError, match=r"Labels \[3\] are outside 0..2"):
        classification_metrics([0, 3], [0, 1], ["a", "b", "c"])


def test_write_json_sorted_newline_atomic(tmp_path, umask):
    path = write_json(tmp_path / "sub" / "m.json", {"b": 1, "a": [1.5]})
    assert path.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"a": [1.5], "b": 1}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]  # no temp file left
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # umask 022: teammates can read it
