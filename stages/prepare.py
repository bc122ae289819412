"""`defuse prepare`: check every image and write the manifest with stratified, seeded splits."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import click

from pipeline import layout
from pipeline.config import PARAMS_FILE, PrepareParams, section
from pipeline.data.manifest import (
    build_manifest,
    manifest_files,
    manifest_json_path,
    write_manifest,
)
from pipeline.data.splits import SPLITS
from pipeline.progress import tracked
from pipeline.storage.outputs import check_file_output

_LISTED = 20  # near-duplicate groups printed; manifest.json has them all


@click.command()
@click.option(
    "--source", help="elpv (the package), folder (root/<class>/<image>) or csv (--labels)."
)
@click.option("--root", help="The image folder when --source is folder.")
@click.option("--labels", help="The labels file (path,label[,split]) when --source is csv.")
@click.option("--classes", help="Comma-separated class names; sets the label order.")
@click.option("--include", help="Comma-separated globs a file must match (folder, csv).")
@click.option("--exclude", help="Comma-separated globs that leave a file out (folder, csv).")
@click.option("--near-duplicate-bits", type=int, help="pHash distance that groups images.")
@click.option("--elpv-classes", type=int, help="4: defect probability levels; 2: p >= 0.5.")
@click.option("--test-fraction", type=float)
@click.option("--val-fraction", type=float, help="Of what remains after the test split.")
@click.option("--seed", type=int)
@click.option("--on-bad-image", help="error: stop and list the files; skip: list in skipped.csv.")
@click.option("--max-pixels", type=int, help="Refuse images larger than this.")
@click.option("--params", "params_path", type=click.Path(path_type=Path), default=PARAMS_FILE)
@click.option("--out", type=click.Path(path_type=Path), default=layout.MANIFEST)
def prepare(params_path, out, **overrides):
    """Build the manifest; every option defaults to params.yaml's `prepare` section."""
    for name in ("classes", "include", "exclude"):
        if overrides[name] is not None:
            overrides[name] = tuple(c.strip() for c in overrides[name].split(",") if c.strip())
    params = section(PrepareParams, "prepare", params_path, **overrides)
    for path in manifest_files(out):
        check_file_output(path, "--out")
    # a bar on a terminal, else one plain line per ~10 % (logs of `dvc repro`)
    bar = functools.partial(tracked, desc="checking images", unit="img")
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
    groups = prepared.near_duplicates
    if groups:
        split_of = {r.path: r.split for r in prepared.rows}
        splits = [sorted({split_of[p] for p in group}) for group in groups]
        straddle = sum(len(s) > 1 for s in splits)
        click.echo(
            f"{len(groups)} near-duplicate group(s), {sum(map(len, groups))} images (pHash within "
            f"{params.near_duplicate_bits} bits), "
            + (f"{straddle} straddling given splits" if straddle else "each kept in one split")
            + f"; all in {manifest_json_path(csv_path)}:"
        )
        for group, names in zip(groups[:_LISTED], splits, strict=False):
            click.echo(f"  {'/'.join(names)}: " + ", ".join(group))
        if len(groups) > _LISTED:
            click.echo(f"  ... and {len(groups) - _LISTED} more")
