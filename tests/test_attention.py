"""scSE modules and Inception-v4-scSE."""

import itertools
import re

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.inception_v4 import InceptionA, InceptionB, InceptionC

from pipeline.models.registry import create_backbone, embed, num_stages
from pipeline.models.scse import SCSE, ChannelSE, SpatialSE

SIZE = 75  # Inception-v4's smallest input


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scse_model():
    torch.manual_seed(0)
    return create_backbone("inception_v4_scse", 4, pretrained=False)


def test_scse_is_channel_plus_spatial_gating():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 5, 7)
    scse = SCSE(32, reduction=16)
    assert scse.cse.fc1.out_features == 2
    channel, spatial = scse.cse(x), scse.sse(x)
    torch.testing.assert_close(scse(x), channel + spatial)
    # cSE scales each channel by one factor in (0, 1); sSE each position, across channels.
    channel_gate, spatial_gate = channel / x, spatial / x
    torch.testing.assert_close(channel_gate, channel_gate[:, :, :1, :1].expand_as(x))
    torch.testing.assert_close(spatial_gate, spatial_gate[:, :1].expand_as(x))
    assert channel_gate.min() > 0 and channel_gate.max() < 1
    assert isinstance(scse.cse, ChannelSE) and isinstance(scse.sse, SpatialSE)


def test_an_scse_follows_every_inception_block(scse_model):
    walk = []  # the modules of `features` in forward order, wrappers opened
    for module in scse_model.features:
        walk += list(module.children()) if hasattr(module, "scse") else [module]
    kinds = [type(m) for m in walk]
    assert kinds.count(SCSE) == 14
    assert (kinds.count(InceptionA), kinds.count(InceptionB), kinds.count(InceptionC)) == (4, 7, 3)
    for before, after in itertools.pairwise(kinds):
        assert (before in (InceptionA, InceptionB, InceptionC)) == (after is SCSE)
    for module in walk:
        if isinstance(module, SCSE):  # channels match the block's output
            assert module.sse.conv.in_channels in (384, 1024, 1536)


def test_output_shapes_and_gradients_reach_every_scse(scse_model):
    x = torch.randn(2, 3, SIZE, SIZE)
    scse_model.train()
    embedding, logits = embed(scse_model, x)
    assert embedding.shape == (2, 1536) and logits.shape == (2, 4)
    logits.logsumexp(1).mean().backward()
    scse_params = [(name, p) for name, p in scse_model.named_parameters() if ".scse." in name]
    assert len(scse_params) == 14 * 6  # fc1, fc2, conv: weight and bias each
    for name, p in scse_params:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    scse_model.zero_grad(set_to_none=True)


def test_stages_keep_scse_with_its_block(scse_model):
    plain = create_backbone("inception_v4", 4, pretrained=False)
    assert num_stages(scse_model) == num_stages(plain) == 19


def test_plain_inception_v4_weights_load_into_everything_but_scse(tmp_path):
    torch.manual_seed(1)
    plain = timm.create_model("inception_v4", pretrained=False).state_dict()  # 1000 classes
    path = tmp_path / "inception_v4.safetensors"
    save_file(plain, path)
    state = create_backbone("inception_v4_scse", 4, weights=path).state_dict()
    unmatched = set(state)
    for key, tensor in plain.items():
        if key.startswith("last_linear."):
            continue
        wrapped = re.sub(r"^features\.(\d+)\.", r"features.\1.block.", key)
        name = wrapped if wrapped in state else key  # wrapped blocks gain a `.block` level
        assert torch.equal(state[name], tensor), key
        unmatched.discard(name)
    assert all(".scse." in k or k.startswith("last_linear.") for k in unmatched)
    assert sum(".scse." in k for k in unmatched) == 14 * 6
