"""The `defuse` command: a click group with one subcommand per stage.

Subcommands are imported on first use, so `defuse --help` answers without loading torch.
"""

from __future__ import annotations

import importlib

import click

from pipeline.errors import DefuseError
from pipeline.runtime import keep_freed_memory
from pipeline.storage.atomic import os_error_message

# name -> "module:attribute"; a new stage adds one line here.
COMMANDS = {
    "prepare": "stages.prepare:prepare",
    "decode": "stages.decode:decode",
    "finetune": "stages.finetune:finetune",
    "extract": "stages.extract:extract",
    "fuse": "stages.fuse:fuse",
    "evaluate": "stages.evaluate:evaluate",
    "export": "stages.export:export",
    "compare": "stages.compare:compare",
    "predict": "stages.predict:predict",
    "cache": "stages.cache:cache",
    "demo": "stages.demo:demo",
}

HELP = {
    "prepare": "Build cache/manifest.csv: content-addressed, checked, stratified splits.",
    "decode": "Decode every image once to one backbone's square input: its image cache.",
    "finetune": "Fine-tune one backbone; write its checkpoint, curves and metrics.",
    "extract": "Write one backbone's penultimate embeddings to an HDF5 feature cache.",
    "fuse": "Train one fusion head on the concatenated cached embeddings.",
    "evaluate": "Test metrics of every model and head; reports/summary.md and figures.",
    "export": "The fused model as one ONNX graph + model.json, runnable without torch.",
    "compare": "Leaderboard of heads x backbone subsets by cross-validation.",
    "predict": "Classify new images with the fine-tuned backbones and a fusion head.",
    "cache": "Inspect (info) or check (verify) feature and image caches.",
    "demo": "Run the whole DAG on the embedded default (ELPV + EfficientNet-Lite trio).",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, HELP[name]) for name in COMMANDS]
        with formatter.section("Commands (DAG order)"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        keep_freed_memory()  # before any stage allocates; loader workers fork with it
        try:
            return super().invoke(ctx)
        except DefuseError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:  # disk full, permission denied, read-only: a line, not a trace
            raise click.ClickException(os_error_message(exc)) from exc


@click.group(cls=_LazyGroup)
@click.version_option(package_name="defuse")
def main():
    """defuse: classify surface-defect images by fusing fine-tuned CNN embeddings.

    Stages run in this order (dvc.yaml wires them; `dvc repro` runs what changed):
    prepare -> decode BACKBONE -> finetune BACKBONE -> extract BACKBONE -> fuse HEAD -> evaluate
    -> export.
    Every option defaults to params.yaml.
    """
