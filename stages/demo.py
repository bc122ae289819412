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
    _headline(paths)


def _headline(paths: dict[str, Path]) -> None:
    """The final head's gain over the best single model, and what reviewing 5 % buys."""
    decisions = json.loads(paths["decisions"].read_text())
    evidence = json.loads(paths["evidence"].read_text())["vs_best_single"]
    final = decisions["final_head"]
    how = f"best val {final['select_by']}" if final["auto"] else "evaluate.final_head"
    if evidence:
        e = evidence["heads"][final["name"]]
        lo, hi = (100 * v for v in e["accuracy_ci"])
        click.echo(
            f"Final head {final['name']} ({how}): {100 * e['accuracy_diff']:+.2f} accuracy points "
            f"over {evidence['best_single']} [95 % CI {lo:+.2f}, {hi:+.2f}]"
        )
    rows = {r["rate"]: r for r in decisions["review"]["models"][final["name"]]}
    if 0.0 in rows and 0.05 in rows:
        none, five = rows[0.0], rows[0.05]
        line = (
            f"Reviewing the least sure 5 % ({five['reviewed']} images, top probability below "
            f"{five['review_below']:.3f}): accuracy on the rest {100 * none['accuracy_kept']:.2f} "
            f"-> {100 * five['accuracy_kept']:.2f} %"
        )
        if "defective_passed_rate" in five:
            line += (
                f", defective parts passed as good {100 * none['defective_passed_rate']:.2f} "
                f"-> {100 * five['defective_passed_rate']:.2f} %"
            )
        click.echo(line)
