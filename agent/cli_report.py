"""`svmotion report FILE.json --png OUT.png`: a migration report without Grafana.

Wired into the CLI by agent/cli.py with `main.add_command(report)`.
"""

from __future__ import annotations

import click

from agent.report import ReportError, load_record, render_png, summary


@click.command("report")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--png", "png", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the convergence curve and throughput over time to this PNG.")
def report(file: str, png: str | None) -> None:
    """Summarize a migration record written by `svmotion migrate --report FILE.json`.

    Example: svmotion report vm1.json --png vm1.png
    """
    try:
        record = load_record(file)
    except ReportError as err:
        raise click.BadParameter(str(err), param_hint="FILE") from None
    click.echo(summary(record))
    if png:
        click.echo(f"wrote {render_png(record, png)}")
