"""Stage one's product: every manifest image's penultimate embedding and logits, streamed
into an HDF5 feature cache. Rows of unchanged samples are reused from the previous cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.backbones import embed
from pipeline.cache import CacheWriter, reusable_cache
from pipeline.checkpoint import backbone_info_of, load_checkpoint
from pipeline.config import ExtractParams
from pipeline.data import Manifest
from pipeline.errors import CacheError
from pipeline.runtime import autocast, library_versions, prepare_model, resolve_device
from pipeline.transforms import ImageDataset, eval_transform, model_input

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractResult:
    path: Path
    n_rows: int
    n_reused: int  # rows copied from the previous cache
    n_computed: int  # rows run through the network


def _tta_embed(model, images: torch.Tensor, tta: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding and logits; with ``tta`` the mean over identity, h-flip and v-flip."""
    if not tta:
        return embed(model, images)
    views = [embed(model, v) for v in (images, images.flip(-1), images.flip(-2))]
    emb = torch.stack([e for e, _ in views]).mean(0)
    return emb, torch.stack([lo for _, lo in views]).mean(0)


def extract(
    manifest: Manifest,
    checkpoint_dir: Path,
    out: Path,
    params: ExtractParams,
    progress: bool = True,
) -> ExtractResult:
    """Write ``out`` for every manifest row, in manifest order, running only new samples."""
    model, sidecar = load_checkpoint(checkpoint_dir)
    if tuple(sidecar["class_names"]) != tuple(manifest.class_names):
        raise CacheError(
            f"Checkpoint {checkpoint_dir} was trained on classes {sidecar['class_names']} but "
            f"{manifest.path} has {list(manifest.class_names)}; re-run finetune on this manifest."
        )
    info = backbone_info_of(sidecar)
    preprocessing = {
        "input_size": info.input_size,
        "mean": list(info.mean),
        "std": list(info.std),
        "layer": "pre_logits",
        "dtype": params.dtype,
        "tta": params.tta,
    }
    old = reusable_cache(out, sidecar["weights_sha256"], preprocessing)
    # Row of each manifest sample in the previous cache, -1 where it must be computed.
    old_row = old.rows_for(manifest.sample_id) if old is not None else np.full(len(manifest), -1)
    new_rows = np.flatnonzero(old_row < 0)
    log.info("%s: %d rows reused, %d to compute", out, len(manifest) - len(new_rows), len(new_rows))

    device = resolve_device(params.device)
    model = prepare_model(model, device)
    loader = DataLoader(
        ImageDataset.from_manifest(manifest, new_rows, eval_transform(info), info.input_size),
        batch_size=params.batch_size,
        num_workers=params.num_workers,
        pin_memory=device.type == "cuda",
    )
    attrs = {
        **preprocessing,
        "backbone": info.name,
        "class_names": list(manifest.class_names),
        "checkpoint_sha256": sidecar["weights_sha256"],
        "manifest_sha256": manifest.sha256,
        "versions": library_versions(),
        "created": sidecar["created"],  # the weights' time: identical inputs give identical bytes
    }
    with CacheWriter(
        out, len(manifest), info.dim, len(manifest.class_names), params.dtype, attrs
    ) as writer:

        def write(rows: np.ndarray, emb: np.ndarray, logits: np.ndarray) -> None:
            # rows are sorted; write each run of consecutive rows as one slice
            for run in np.split(np.arange(len(rows)), np.flatnonzero(np.diff(rows) != 1) + 1):
                a, b = int(rows[run[0]]), int(rows[run[-1]]) + 1
                writer.write(
                    a,
                    emb[run],
                    logits[run],
                    manifest.sample_id[a:b],
                    manifest.label[a:b],
                    manifest.split[a:b],
                )

        kept = np.flatnonzero(old_row >= 0)
        for chunk in np.array_split(kept, max(1, len(kept) // 4096)) if len(kept) else ():
            write(chunk, old.embeddings[old_row[chunk]], old.logits[old_row[chunk]])
        for index, emb, logits in _batches(model, loader, info, device, params.tta, progress):
            write(new_rows[index], emb, logits)
    return ExtractResult(out, len(manifest), len(manifest) - len(new_rows), len(new_rows))


@torch.inference_mode()
def _batches(model, loader, info, device, tta: bool, progress: bool):
    """Yield ``(rows, embeddings, logits)`` per batch, as float32 numpy arrays on the CPU."""
    model.eval()
    for images, _, index in tqdm(
        loader, desc=f"extract {info.name}", unit="batch", disable=not progress
    ):
        with autocast(device):
            emb, logits = _tta_embed(model, model_input(images, info, device), tta)
        yield index.numpy(), emb.float().cpu().numpy(), logits.float().cpu().numpy()
