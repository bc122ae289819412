"""ResNet (He et al., 2016): one of the fusion paper's three fused models."""

from pipeline.models.registry import register_backbone
from pipeline.models.weights import timm_backbone


@register_backbone
def resnet50(**kwargs):
    return timm_backbone("resnet50", **kwargs)
