"""ShuffleNet-v2 1.0x (Ma et al., 2018), compared in the attention paper: torchvision's, given
timm's interface (timm has no ShuffleNet)."""

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.models.registry import register_backbone
from pipeline.models.weights import from_hub, load_imagenet, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ShuffleNetV2(torchvision.models.ShuffleNetV2):
    """torchvision's ShuffleNet-v2 1.0x with timm's interface.

    Key names are torchvision's, so its ImageNet weights load unchanged.
    """

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.0):
        super().__init__([4, 8, 4], [24, 116, 232, 464, 1024], num_classes=num_classes)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = 1024
        self.drop_rate = drop_rate
        self.pretrained_cfg = dict(
            architecture="shufflenet_v2_x1_0",
            input_size=(3, 224, 224),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            interpolation="bilinear",  # torchvision's ImageNet transforms
            classifier="fc",
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.conv5(self.stage4(self.stage3(self.stage2(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.dropout(x.mean((2, 3)), p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^conv1", blocks=[(r"^stage(\d+)", None), (r"^conv5", (5,))])

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


@register_backbone
def shufflenet_v2(*, num_classes, pretrained, weights, drop_rate):
    model = ShuffleNetV2(num_classes, drop_rate)
    if pretrained and weights:
        load_imagenet(model, read_state_dict(weights), weights)
    elif pretrained:
        tv = torchvision.models.ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1
        state = from_hub(lambda: tv.get_state_dict(progress=False), f" (e.g. from {tv.url})")
        load_imagenet(model, state, tv.url)
    return model
