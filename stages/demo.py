"""`defuse demo`: the README's main job, `dvc repro` on the embedded default, then the headline."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import click

from pipeline import layout


@click.command()
@click.option("--force", is_flag=True, help="Rerun every stage, even unchanged ones.")
def demo(force):
    """Run the whole DAG with `dvc repro` (ELPV + EfficientNet-Lite trio by default) and
    print where the report is and the headline figures.

    Only what changed since the last run is recomputed; the first run on 2 CPU cores takes
    about a quarter of an hour.
    """
    dvc = shutil.which("dvc")
    if dvc is None:
        raise click.ClickException(
            "`dvc` is not on PATH; install defuse into this environment (`make demo`)."
        )
    if not Path("dvc.yaml").is_file():
        raise click.ClickException(
            "No dvc.yaml here: run `defuse demo` from the defuse project folder."
        )
    if not Path(".dvc").is_dir():
        subprocess.run([dvc, "init", "--no-scm" if not Path(".git").exists() else "-q"], check=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    cmd = [dvc, "repro", *(["--force"] if force else [])]
    click.echo(f"$ {' '.join(cmd)}")
    if subprocess.run(cmd, env=env).returncode != 0:
        raise click.ClickException("dvc repro failed; the stage's error is printed above.")

    paths = layout.evaluate_reports()
    metrics = json.loads(paths["metrics"].read_text())
    click.echo(f"\nReport: {paths['summary'].resolve()}")
    click.echo(f"Figures: {paths['figures'].resolve()}")
    click.echo("Test split (accuracy / macro F1):")
    for name, m in sorted(metrics.items(), key=lambda kv: -kv[1]["accuracy"]):
        click.echo(f"  {name:<24} {m['accuracy']:.4f} / {m['f1_macro']:.4f}")
