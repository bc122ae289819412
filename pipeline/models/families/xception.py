"""Xception (Chollet, 2017), in both papers; timm's original-weights port."""

from pipeline.models.registry import register_backbone
from pipeline.models.weights import timm_backbone


@register_backbone
def xception(**kwargs):
    return timm_backbone("legacy_xception", **kwargs)
