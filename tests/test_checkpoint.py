"""The checkpoint record (`model.json`): written whole by finetune, validated whole on load."""

import json
import shutil

import pytest

from pipeline.errors import CheckpointError
from pipeline.models.checkpoint import SIDECAR, CheckpointRecord, load_checkpoint, read_record
from pipeline.models.preprocessing import Preprocessing


def test_the_record_round_trips_and_nests_the_preprocessing_record_whole(tiny_run):
    record = read_record(tiny_run["checkpoint"])
    assert CheckpointRecord.from_json(record.to_json()) == record
    assert record.to_json() == (tiny_run["checkpoint"] / SIDECAR).read_text()
    nested = json.loads(record.to_json())["preprocessing"]
    assert Preprocessing.from_json(nested) == record.preprocessing
    assert record.preprocessing.resize == record.params["resize"] == "stretch"
    assert record.info.preprocessing is record.preprocessing and record.info.dim == 1280


def _edited(tiny_run, tmp_path, edit) -> None:
    ckpt = shutil.copytree(tiny_run["checkpoint"], tmp_path / "ckpt")
    data = json.loads((ckpt / SIDECAR).read_text())
    edit(data)
    (ckpt / SIDECAR).write_text(json.dumps(data))
    return ckpt


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda d: d.pop("best_epoch"), r"missing \['best_epoch'\]"),
        (lambda d: d.update(resize="stretch"), r"unknown \['resize'\]"),  # the old layout
        (lambda d: d.update(dim="1280"), r"field 'dim' is invalid: '1280'"),
        (lambda d: d.update(weights_sha256="abc"), r"field 'weights_sha256' is invalid"),
        (lambda d: d["preprocessing"].update(resize="fit"), r"preprocessing: resize must be one"),
        (lambda d: d["preprocessing"].pop("std"), r"preprocessing: a preprocessing record has"),
    ],
)
def test_a_damaged_record_is_refused_naming_model_json_and_the_field(
    tiny_run, tmp_path, edit, says
):
    ckpt = _edited(tiny_run, tmp_path, edit)
    for load in (read_record, load_checkpoint):
        with pytest.raises(CheckpointError, match=says) as err:
            load(ckpt)
        assert str(ckpt / SIDECAR) in str(err.value)


def test_text_that_is_not_json_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"x/model.json is not valid JSON"):
        CheckpointRecord.from_json("{", "x/model.json")
