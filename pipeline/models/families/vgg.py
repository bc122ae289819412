"""VGG (Simonyan & Zisserman, 2015): the fusion paper's weakest single model."""

from pipeline.models.registry import register_backbone
from pipeline.models.weights import timm_backbone


@register_backbone
def vgg16(**kwargs):
    return timm_backbone("vgg16", **kwargs)
