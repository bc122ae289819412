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
@options.reports
@options.params
@click.option("--epochs", type=int, help="Override finetune.epochs.")
@click.option("--batch-size", type=int, help="Override finetune.batch_size.")
@click.option("--device", help="Override finetune.device (auto, cpu, cuda, cuda:1).")
def finetune(backbone, manifest, out, reports, params_path, epochs, batch_size, device):
    """Fine-tune BACKBONE on the manifest's train split (best epoch on val).

    Reads params.yaml's `finetune` section overridden by `backbones.BACKBONE`. Writes the
    checkpoint (model.safetensors + model.json), the per-epoch history CSV and its PNG, and
    the val and test metrics JSON.
    """
    from pipeline import distributed
    from pipeline.config import finetune_params
    from pipeline.data import read_manifest
    from pipeline.finetune import finetune as run
    from pipeline.finetune import write_history
    from pipeline.metrics import write_json
    from pipeline.report import plot_history
    from pipeline.runtime import resolve_device

    params = finetune_params(
        backbone, params_path, epochs=epochs, batch_size=batch_size, device=device
    )
    # Under torchrun the process group spans the reports too: every process ends after them.
    with distributed.process_group(resolve_device(params.device)) as here:
        result = run(
            read_manifest(manifest), backbone, params, out or layout.checkpoint_dir(backbone)
        )
        if here.is_main:  # rank 0 writes; the others wait at the barrier
            paths = layout.finetune_reports(backbone, reports)
            write_history(result.history, paths["history"])
            plot_history(result.history, paths["curves"], f"{backbone} fine-tuning")
            write_json(
                paths["metrics"],
                {
                    "best_epoch": result.sidecar["best_epoch"],
                    "val": result.val_metrics,
                    "test": result.test_metrics,
                },
            )
            val = result.val_metrics
            click.echo(
                f"{backbone}: best epoch {result.sidecar['best_epoch']}, val accuracy {val['accuracy']:.4f}, macro F1 {val['f1_macro']:.4f}"
            )
        distributed.barrier()
