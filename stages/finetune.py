"""`defuse finetune BACKBONE`: the finetune@<backbone> stage."""

from pathlib import Path

import click

from pipeline import layout
from stages import options


@click.command()
@click.argument("backbone")
@options.manifest
@click.option(
    "--out", type=click.Path(path_type=Path), help="Checkpoint folder [cache/models/BACKBONE]."
)
@options.images
@options.reports
@options.params
@click.option("--epochs", type=int, help="Override finetune.epochs.")
@click.option("--batch-size", type=int, help="Override finetune.batch_size.")
@click.option("--device", help="Override finetune.device (auto, cpu, cuda, cuda:1).")
def finetune(backbone, manifest, out, images, reports, params_path, epochs, batch_size, device):
    """Fine-tune BACKBONE on the manifest's train split (best epoch on val).

    Reads params.yaml's `finetune` section overridden by `backbones.BACKBONE`, and the
    images from BACKBONE's image cache (`defuse decode BACKBONE`). Writes the
    checkpoint (model.safetensors + model.json), the per-epoch history CSV and its PNG, and
    the val and test metrics JSON. With `finetune.cross_fit: K` it then trains K fold
    models into the checkpoint's folds/<k>/, each without one K-th of the train rows, so
    that `extract` can embed every train image with a model that never saw it.
    """
    from pipeline import distributed
    from pipeline.config import finetune_params
    from pipeline.data.manifest import read_manifest
    from pipeline.finetune import cross_fit_folds, write_reports
    from pipeline.finetune import finetune as run
    from pipeline.models.checkpoint import CHECKPOINT_FOLDER
    from pipeline.runtime import resolve_device
    from pipeline.storage.outputs import check_folder_output, check_outputs

    out = check_folder_output(out or layout.checkpoint_dir(backbone), "--out", CHECKPOINT_FOLDER)
    check_folder_output(reports, "--reports")
    check_outputs(layout.finetune_reports(backbone, reports).values(), "--reports")
    params = finetune_params(
        backbone, params_path, epochs=epochs, batch_size=batch_size, device=device
    )
    man = read_manifest(manifest)
    images = options.image_cache(images, backbone)
    # Under torchrun the process group spans the reports too: every process ends after them.
    with distributed.process_group(resolve_device(params.device)) as here:
        result = run(man, backbone, params, out, images=images)
        if here.is_main:  # rank 0 writes; the others wait at the barrier
            write_reports(result, backbone, layout.finetune_reports(backbone, reports))
            val = result.val_metrics
            click.echo(
                f"{backbone}: best epoch {result.record.best_epoch}, val accuracy {val['accuracy']:.4f}, macro F1 {val['f1_macro']:.4f}"
            )
        # After the main model, whose folder save_checkpoint replaces whole.
        for k, held_out in enumerate(cross_fit_folds(man, params.cross_fit, params.seed)):
            fold = run(
                man, backbone, params, layout.fold_dir(out, k), held_out=held_out, images=images
            )
            if here.is_main:
                click.echo(
                    f"  fold {k + 1}/{params.cross_fit} (without {len(held_out)} train rows): "
                    f"val accuracy {fold.val_metrics['accuracy']:.4f}"
                )
        distributed.barrier()
