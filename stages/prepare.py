"""`defuse prepare`: check every image and write the manifest with stratified, seeded splits."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import click
from tqdm import tqdm

from pipeline import layout
from pipeline.config import PARAMS_FILE, PrepareParams, section
from pipeline.data import SPLITS, build_manifest, write_manifest


@click.command()
@click.option("--source", help="elpv (the elpv-dataset package) or folder (root/<class>/<image>).")
@click.option("--root", help="The image folder when --source is folder.")
@click.option("--classes", help="Comma-separated class folders; sets the label order.")
@click.option("--elpv-classes", type=int, help="4: defect probability levels; 2: p >= 0.5.")
@click.option("--test-fraction", type=float)
@click.option("--val-fraction", type=float, help="Of what remains after the test split.")
@click.option("--seed", type=int)
@click.option("--on-bad-image", help="error: stop and list the files; skip: list in skipped.csv.")
@click.option("--max-pixels", type=int, help="Refuse images larger than this.")
@click.option("--params", "params_path", type=click.Path(path_type=Path), default=PARAMS_FILE)
@click.option("--out", type=click.Path(path_type=Path), default=layout.MANIFEST)
def prepare(params_path, out, classes, **overrides):
    """Build the manifest; every option defaults to params.yaml's `prepare` section."""
    if classes is not None:
        overrides["classes"] = tuple(c.strip() for c in classes.split(",") if c.strip())
    params = section(PrepareParams, "prepare", params_path, **overrides)
    bar = functools.partial(tqdm, desc="checking images", unit="img", leave=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = build_manifest(params, progress=bar)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)

    csv_path, _, skipped_csv = write_manifest(out, prepared)
    counts = prepared.counts()
    click.echo(
        f"{len(prepared.rows)} images, {len(prepared.class_names)} classes from "
        f"{params.source} ({prepared.root}) -> {csv_path}"
    )
    width = max(len(c) for c in (*prepared.class_names, "class"))
    click.echo(f"  {'class':<{width}}" + "".join(f"{s:>7}" for s in (*SPLITS, "total")))
    for name in prepared.class_names:
        cells = [counts["split_class"][s][name] for s in SPLITS] + [counts["class"][name]]
        click.echo(f"  {name:<{width}}" + "".join(f"{n:>7}" for n in cells))
    totals = [counts["split"][s] for s in SPLITS] + [len(prepared.rows)]
    click.echo(f"  {'total':<{width}}" + "".join(f"{n:>7}" for n in totals))
    if prepared.skipped:
        click.echo(f"warning: skipped {len(prepared.skipped)} bad image(s); see {skipped_csv}")
    if prepared.duplicates:
        click.echo(f"collapsed {len(prepared.duplicates)} duplicate image(s) within their class")
