"""Inception-v3 (fusion paper), Inception-v4 and Inception-v4 with scSE attention (attention
paper)."""

from pipeline.models.registry import register_backbone
from pipeline.models.scse import add_scse
from pipeline.models.weights import timm_backbone


@register_backbone
def inception_v3(**kwargs):
    return timm_backbone("inception_v3", **kwargs)


@register_backbone
def inception_v4(**kwargs):
    return timm_backbone("inception_v4", **kwargs)


@register_backbone
def inception_v4_scse(**kwargs):
    return add_scse(timm_backbone("inception_v4", **kwargs))  # ImageNet weights, new SCSE modules
