"""params.yaml is the one source: complete sections, strict types, clean errors naming the
file, key and value."""

import pytest
import yaml
from conftest import full_params, write_params

from pipeline.config import (
    CompareParams,
    ExtractParams,
    FinetuneParams,
    FuseParams,
    PrepareParams,
    ReviewParams,
    evaluate_params,
    finetune_params,
    head_params,
    load_params,
    section,
)
from pipeline.errors import ConfigError

LITE0 = "tf_efficientnet_lite0"

# (section, key, bad value, what the error says after "<section>.<key> must be ")
BAD_VALUES = [
    ("finetune", "epochs", "three", "an int; got 'three' (str)."),
    ("finetune", "epochs", 1.5, "an int; got 1.5 (float)."),
    ("finetune", "epochs", True, "an int; got True (bool)."),
    ("finetune", "lr", "fast", "a number; got 'fast' (str)."),
    ("finetune", "lr", "1e-3", "a number; got '1e-3' (str) (YAML reads 1e-3 as text: write it "
                               "with a dot, e.g. 1.0e-3)."),
    ("finetune", "pretrained", "false", "true or false; got 'false' (str) (quoted, it is text: "
                                        "write true or false without quotes)."),
    ("finetune", "batch_size", "32", "an int; got '32' (str) (quoted, it is text: write the "
                                     "number without quotes)."),
    ("finetune", "weights", 3, "a string or null; got 3 (int)."),
    ("finetune", "device", "gpu", "'auto', 'cpu', 'cuda' or 'cuda:<index>' (e.g. 'cuda:1'). "
                                  "Got 'gpu'."),
    ("extract", "device", "cuda:x", "'auto', 'cpu', 'cuda' or 'cuda:<index>'"),
    ("extract", "tta", "false", "true or false; got 'false' (str)"),
    ("extract", "batch_size", 0, ">= 1. Got 0."),
    ("prepare", "classes", "crack", "a list of strings or null; got 'crack' (str)."),
    ("fuse", "memory_gb", float("nan"), "a number; got nan (float)."),
]  # fmt: skip
READERS = {
    "finetune": lambda p: finetune_params(LITE0, p),
    "extract": lambda p: section(ExtractParams, "extract", p),
    "prepare": lambda p: section(PrepareParams, "prepare", p),
    "fuse": lambda p: section(FuseParams, "fuse", p),
}


@pytest.mark.parametrize(("name", "key", "value", "says"), BAD_VALUES)
def test_a_bad_value_names_file_key_value_and_what_is_allowed(tmp_path, name, key, value, says):
    path = write_params(tmp_path / "params.yaml", **{name: {key: value}})
    with pytest.raises(ConfigError) as err:
        READERS[name](path)
    assert str(err.value).startswith(f"{path}: {name}.{key} must be ")
    assert says in str(err.value)


def test_the_projects_values_are_read_as_their_field_types(tmp_path):
    params = finetune_params(LITE0, write_params(tmp_path / "p.yaml", finetune={"lr": 1}))
    assert params.lr == 1.0 and isinstance(params.lr, float)  # a float field takes an int
    assert params.rotation == 0.0 and params.pretrained is True and params.input_size == 224
    assert section(ExtractParams, "extract", tmp_path / "p.yaml", device="cuda:1").device == (
        "cuda:1"
    )
    # dataclasses built directly are checked the same way
    with pytest.raises(ConfigError, match=r"^extract\.tta must be true or false; got 'no'"):
        ExtractParams(
            batch_size=8, dtype="float32", tta="no", num_workers=0, device="cpu", engine="torch"
        )


def test_a_backbone_override_is_named_where_it_was_written(tmp_path):
    path = write_params(tmp_path / "p.yaml", backbones={LITE0: {"epochs": "3"}})
    with pytest.raises(ConfigError, match=rf"backbones\.{LITE0}\.epochs must be an int; got '3'"):
        finetune_params(LITE0, path)
    write_params(path, backbones={LITE0: {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epoch'\] \(did you mean 'epochs'"):
        finetune_params(LITE0, path)


def test_no_defaults_to_fall_back_on(tmp_path):
    params = full_params()
    del params["finetune"]["rotation"]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"section 'finetune' lacks key\(s\) \['rotation'\]"):
        finetune_params(LITE0, path)
    del params["compare"]
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=rf"{path}: no 'compare' section"):
        section(CompareParams, "compare", path)
    with pytest.raises(TypeError):
        FinetuneParams(epochs=3)  # the dataclasses themselves have none either
    with pytest.raises(ConfigError, match=r"heads has no entry 'svm'; its entries: \["):
        head_params("svm", write_params(tmp_path / "q.yaml"))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("finetune:\n  epochs: [1\n", "not valid YAML at line 3, column 1: expected ',' or ']'"),
        ("finetune: 3\n", "section 'finetune' must be a mapping of keys; got 3 (int)."),
        ("finetun:\n  epochs: 3\n", "unknown section(s) ['finetun'] (did you mean 'finetune'?)"),
        ("heads:\n  late:\n", "heads.late must be a mapping of keys ({} for none); got None"),
        ("- prepare\n", "must be a mapping of sections"),
    ],
)
def test_a_malformed_file_is_one_line_naming_it(tmp_path, text, says):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value).startswith(str(path)) and says in str(err.value)
    assert "\n" not in str(err.value)


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"absent\.yaml: no such params file"):
        load_params(tmp_path / "absent.yaml")


def test_final_head_must_be_an_entry_of_heads(tmp_path):
    path = write_params(tmp_path / "p.yaml", evaluate={"final_head": "mpl"})
    with pytest.raises(ConfigError, match=r"evaluate\.final_head is 'mpl', not an entry of heads"):
        evaluate_params(path)
    assert evaluate_params(path, final_head="late").final_head == "late"
    assert evaluate_params(path, final_head="auto").final_head == "auto"


@pytest.mark.parametrize(
    ("review", "says"),
    [
        ({"below": 0.0}, r"review\.below must be a probability in \(0, 1\]\. Got 0\.0"),
        ({"below": 1.5}, r"review\.below must be a probability in \(0, 1\]\. Got 1\.5"),
        ({"rates": [0.05, 1.0]}, r"review\.rates must be .* in \[0, 1\)\. Got \[0\.05, 1\.0\]"),
        ({"rates": []}, r"review\.rates must be a non-empty list"),
        (
            {"defect_free": "functional"},
            r"review\.defect_free must be a list of strings or null; got .functional. \(str\)",
        ),
    ],
)
def test_review_values_are_checked(tmp_path, review, says):
    path = write_params(tmp_path / "p.yaml", review=review)
    with pytest.raises(ConfigError, match=says):
        section(ReviewParams, "review", path)


def test_review_defect_free_classes_must_be_the_datasets(tmp_path):
    review = section(ReviewParams, "review", write_params(tmp_path / "p.yaml"))
    review.check_classes(["functional", "defective"], "p.yaml")  # ELPV's: the default fits
    with pytest.raises(ConfigError, match=r"names \['functional'\], not classes of this dataset"):
        review.check_classes(["ok", "crack"], "p.yaml")
    with pytest.raises(ConfigError, match=r"names every class \['functional'\]"):
        review.check_classes(["functional"], "p.yaml")
