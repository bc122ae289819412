"""The backbone registry: every registered backbone goes through the same contract checks."""

from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.models.registry import (
    backbone_info,
    create_backbone,
    embed,
    family_of,
    freeze_stages,
    list_backbones,
    num_stages,
    set_train_mode,
)
from pipeline.report.explain import grad_cam

REPO = Path(__file__).resolve().parents[1]
SIZE = 75  # the smallest input every registered backbone takes (Inception-v3/v4 need 75)
CLASSES = 3

# Stage counts from timm's coarse group_matcher, stem merged into stage 1 (documentation).
KNOWN_STAGES = {
    "vgg16": 12,
    "resnet50": 4,
    "inception_v3": 12,
    "xception": 13,
    "inception_v4": 19,
    "inception_v4_scse": 19,
    "shufflenet_v2": 4,
    "tf_efficientnet_lite0": 7,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list_backbones())
def built(request):
    """(name, model): one randomly initialised model per backbone, shared by the tests below."""
    torch.manual_seed(0)
    return request.param, create_backbone(request.param, CLASSES, pretrained=False)


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_forward_backward_with_frozen_stem(built):
    name, model = built
    try:
        frozen = freeze_stages(model, 1)
        params = list(model.parameters())
        assert frozen == sum(p.numel() for p in params if not p.requires_grad) > 0
        assert not params[0].requires_grad  # the stem is part of stage 1
        set_train_mode(model)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert all(m.training == any(p.requires_grad for p in m.parameters()) for m in norms)
        logits = model(_images())
        assert logits.shape == (2, CLASSES)
        assert torch.isfinite(logits).all()
        logits.logsumexp(1).mean().backward()
        for p in params:
            assert (p.grad is None) == (not p.requires_grad), name
            assert p.grad is None or torch.isfinite(p.grad).all(), name
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(True)


def test_stages(built):
    name, model = built
    stages = num_stages(model)
    assert stages == KNOWN_STAGES.get(name, stages)
    with pytest.raises(ConfigError, match=f"has {stages} stages"):
        freeze_stages(model, stages + 1)
    try:
        # Freezing every stage leaves only the head trainable (for VGG, timm's head has fc6/fc7).
        freeze_stages(model, stages)
        head = (model.pretrained_cfg["classifier"] + ".", "pre_logits.")
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(n.startswith(head) for n in trainable), trainable
    finally:
        model.requires_grad_(True)


def test_embed_matches_forward_and_dropout_precedes_classifier(built):
    name, model = built
    x = _images()
    with torch.no_grad():
        embedding, logits = embed(model.eval(), x)
        torch.testing.assert_close(logits, model(x))
        assert embedding.shape == (2, backbone_info(name).dim)
        assert torch.isfinite(embedding).all()

        # drop_rate=0.5 zeroes about half of the classifier's (otherwise non-zero) inputs.
        seen = []
        hook = model.get_classifier().register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        features = model.forward_features(x)
        model.forward_head(features)
        torch.manual_seed(0)
        model.train().forward_head(features)
        hook.remove()
    zero_eval, zero_train = ((z == 0).float().mean().item() for z in seen)
    assert zero_train == pytest.approx(zero_eval + 0.5 * (1 - zero_eval), abs=0.1)


def test_timm_interface(built):
    name, model = built
    info = backbone_info(name)
    cfg, prep = model.pretrained_cfg, info.preprocessing
    assert cfg["input_size"] == (3, prep.input_size, prep.input_size)
    assert (prep.mean, prep.std) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    assert prep.interpolation == cfg["interpolation"] and prep.resize == "stretch"
    assert model.get_classifier().out_features == CLASSES
    assert model.get_classifier().in_features == info.dim
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5
    model.reset_classifier(CLASSES)


def test_grad_cam_maps_the_input_and_gives_the_models_probabilities(built):
    _, model = built
    x, classes = _images(), torch.tensor([0, CLASSES - 1])
    heat, prob = grad_cam(model.eval(), x, classes)
    assert heat.shape == (2, SIZE, SIZE) and torch.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1
    with torch.no_grad():
        torch.testing.assert_close(prob, model(x).softmax(1)[[0, 1], classes])


def test_backbone_info_is_cached_and_overridable():
    assert backbone_info("resnet50") is backbone_info("resnet50")
    assert backbone_info("resnet50").dim == 2048
    assert backbone_info("vgg16").dim == 4096  # fc7, not the 512-d pooled conv features
    assert backbone_info("tf_efficientnet_lite2").preprocessing.input_size == 260
    scse = backbone_info("inception_v4_scse", input_size=400)
    assert scse.preprocessing.input_size == 400
    assert scse.preprocessing.mean == backbone_info("inception_v4_scse").preprocessing.mean


def test_each_backbone_lives_in_its_family_file():
    """What params.yaml's `backbones.<name>.family` must say (dvc.yaml's deps use it)."""
    assert family_of("tf_efficientnet_lite1") == "efficientnet_lite"
    assert family_of("inception_v4_scse") == "inception"
    for name in list_backbones():
        assert (REPO / "pipeline" / "models" / "families" / f"{family_of(name)}.py").is_file()


def test_unknown_backbone_lists_registered_names():
    with pytest.raises(ConfigError, match="resnet5") as err:
        create_backbone("resnet5", CLASSES)
    assert all(name in str(err.value) for name in list_backbones())


def test_random_initialisation_is_logged_loudly(caplog):
    create_backbone("shufflenet_v2", CLASSES, pretrained=False)
    assert "random initialisation" in caplog.text and "shufflenet_v2" in caplog.text
    caplog.clear()
    create_backbone("shufflenet_v2", CLASSES, pretrained=False, quiet=True)  # weights follow
    assert "random initialisation" not in caplog.text
