"""Pictures of the errors: the final head's most confident test errors, and each fine-tuned
backbone's Grad-CAM (Selvaraju et al., 2017) of them for the class the head predicted.

Grad-CAM is a few lines of autograd on timm's interface, so it is done here rather than with
pip's `grad-cam`, which would bring OpenCV in as a dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import layout
from pipeline.data.images import load_image
from pipeline.data.manifest import Manifest
from pipeline.data.transforms import ImageDataset, eval_transform, model_input
from pipeline.errors import CheckpointError
from pipeline.models.checkpoint import load_checkpoint
from pipeline.runtime import prepare_model, resolve_device
from pipeline.storage.fused import FusedFeatures

THUMBNAIL = 160  # pixels, the longer side of a gallery thumbnail
_BATCH = 16  # images per Grad-CAM pass: bounds the memory a large evaluate.gallery takes


@dataclass(frozen=True)
class GradCam:
    """One backbone's Grad-CAM of the gallery's images."""

    images: np.ndarray  # (n, H, W, 3) uint8: each image as the backbone saw it
    heat: np.ndarray  # (n, H, W) float32 in [0, 1], 1 at each image's maximum
    prob: np.ndarray  # (n,) the backbone's probability of the class explained


@dataclass(frozen=True)
class Gallery:
    """The final head's most confident test errors and the backbones' Grad-CAM of them."""

    head: str
    n_test: int
    n_errors: int  # the head's test errors; the first len(names) of them are pictured
    class_names: tuple[str, ...]
    names: tuple[str, ...]  # image file names
    thumbnails: tuple[np.ndarray, ...]  # (h, w, 3) uint8, longer side THUMBNAIL
    true: np.ndarray  # (n,) labels
    pred: np.ndarray  # (n,) the head's predictions
    prob: np.ndarray  # (n,) the head's probability of its prediction
    cams: dict[str, GradCam]  # backbone -> its Grad-CAM of the predicted classes
    skipped: dict[str, str]  # backbone -> why it has no Grad-CAM


def grad_cam(
    model: torch.nn.Module, x: torch.Tensor, classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM ``(B, H, W)`` in [0, 1] of ``classes`` ``(B,)`` on normalised images ``x``
    ``(B, 3, H, W)``, and the model's probabilities ``(B,)`` of them.

    The gradient of each class's logit (the model's own classifier) with respect to the last
    feature map (timm's `forward_features`, before pooling), averaged over positions, weights
    the map's channels; the ReLU of the weighted sum, upsampled to the input, is the heat map.
    """
    with torch.no_grad():  # the trunk needs no graph: only the map's gradient is wanted
        maps = model.forward_features(x)
    with torch.enable_grad():
        maps.requires_grad_(True)
        logits = model.get_classifier()(model.forward_head(maps, pre_logits=True))
        chosen = logits.gather(1, classes[:, None])
        # each logit depends on its own image only, so one backward serves the batch
        (grads,) = torch.autograd.grad(chosen.sum(), maps)
    weights = grads.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
    cam = F.relu((weights * maps.detach()).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.amax((1, 2), keepdim=True).clamp_min(1e-12)
    return cam, logits.detach().softmax(1).gather(1, classes[:, None])[:, 0]


def explain(
    checkpoint: Path,
    paths: list[Path],
    classes: np.ndarray,
    extracted_sha256: str,
    *,
    max_pixels: int,
    device: torch.device,
) -> GradCam:
    """Grad-CAM of ``classes`` (n,) on the images at ``paths`` by the fine-tuned model in
    ``checkpoint`` on ``device``, preprocessed as `defuse extract` does. CheckpointError if it is missing,
    damaged, or not the checkpoint (weights sha256) its feature cache was extracted with."""
    model, record = load_checkpoint(checkpoint)
    if record.weights_sha256 != extracted_sha256:
        raise CheckpointError(
            f"{checkpoint} holds weights {record.weights_sha256[:12]}, but the feature cache "
            f"of {record.backbone} was extracted with {extracted_sha256[:12]}; re-run "
            f"`defuse extract {record.backbone}` (or `dvc repro`)."
        )
    prep = record.preprocessing
    model = prepare_model(model, device)
    data = ImageDataset(paths, None, eval_transform(prep), prep.input_size, max_pixels=max_pixels)
    images = torch.stack([data[i][0] for i in range(len(data))])  # (n, 3, H, W) uint8
    heat, prob = [], []
    for start in range(0, len(images), _BATCH):
        x = model_input(images[start : start + _BATCH], prep, device)
        wanted = torch.as_tensor(classes[start : start + _BATCH], device=device)
        h, p = grad_cam(model, x, wanted)
        heat.append(h.float().cpu().numpy())
        prob.append(p.float().cpu().numpy())
    return GradCam(images.permute(0, 2, 3, 1).numpy(), np.concatenate(heat), np.concatenate(prob))


def gallery(
    manifest: Manifest,
    features: FusedFeatures,
    result: dict,
    head: str,
    cap: int,
    models_dir: Path,
    *,
    device: str,
) -> Gallery:
    """The ``cap`` test images that ``head`` got wrong with the highest probability, and each
    backbone's Grad-CAM of them for the class it predicted (checkpoints in ``models_dir``);
    a backbone whose checkpoint is missing or unusable is left out, with the reason.
    ``device``: where Grad-CAM runs (`evaluate.device`: "auto", "cpu", "cuda[:n]").

    ``result``: the head's entry in `pipeline.fusion.fit.evaluate`'s results (test rows in the
    caches' order).
    """
    test = np.flatnonzero(features.split == "test")
    wrong = np.flatnonzero(result["y_pred"] != result["y_true"])
    shown = wrong[np.argsort(-result["p_pred"][wrong], kind="stable")][:cap]
    row_of = {sid: i for i, sid in enumerate(manifest.sample_id)}
    paths = [manifest.image_path(row_of[sid]) for sid in features.sample_id[test[shown]]]
    pred = result["y_pred"][shown]
    cams, skipped, where = {}, {}, resolve_device(device)
    for backbone in features.backbones if len(shown) else ():
        try:
            cams[backbone] = explain(
                layout.checkpoint_dir(backbone, models_dir),
                paths,
                pred,
                features.extraction[backbone]["checkpoint_sha256"],
                max_pixels=manifest.max_pixels,
                device=where,
            )
        except CheckpointError as exc:
            skipped[backbone] = str(exc)
    return Gallery(
        head=head,
        n_test=len(test),
        n_errors=len(wrong),
        class_names=tuple(features.class_names),
        names=tuple(p.name for p in paths),
        thumbnails=tuple(thumbnail(p, manifest.max_pixels) for p in paths),
        true=result["y_true"][shown],
        pred=pred,
        prob=result["p_pred"][shown],
        cams=cams,
        skipped=skipped,
    )


def thumbnail(path: Path, max_pixels: int) -> np.ndarray:
    """The image at ``path`` as (h, w, 3) uint8, its longer side at most THUMBNAIL."""
    image = load_image(path, max_pixels=max_pixels, size=THUMBNAIL)
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return np.asarray(image)
