"""`svmotion lab up|down|status|migrate|query`: the lab on this machine (nslab.py), README "Lab".

agent/cli.py adds this group (`main.add_command(lab)`); `python -m svlab` runs it alone.
Errors are one line: exit 3 for a refusal (a lab already up, none to take down), 1 when the
lab could not be brought up or down (the line names the log to read); `migrate` exits with
svmotion's own code (README, "Commands and exit codes").
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from agent.errors import SvmotionError, die


@click.group("lab")
@click.option("--dir", "labdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The lab's directory (default /var/tmp/svlab): every host's files, logs, state.")
@click.pass_context
def lab(ctx: click.Context, labdir: Path | None) -> None:
    """The svmotion lab on this machine: src, dst and mon as network namespaces (needs root)."""
    from svlab.nslab import DEFAULT_DIR
    ctx.obj = labdir or DEFAULT_DIR


@lab.command("up")
@click.option("--guest-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the guest's images are cached (default ~/.cache/svmotion/lab).")
@click.pass_obj
def up_cmd(labdir: Path, guest_cache: Path | None) -> None:
    """Make the hosts, provision each one (vagrant/provision.sh), start the agents, guest, Prometheus."""
    from svlab import nslab
    started = time.monotonic()
    try:
        ns = nslab.up(labdir, guest_cache, progress=lambda s: click.echo(f"svlab: {s}", err=True))
    except SvmotionError as err:
        die(err)
    click.echo(f"svlab: up in {time.monotonic() - started:.0f} s", err=True)
    click.echo(ns.summary())


@lab.command("down")
@click.pass_obj
def down_cmd(labdir: Path) -> None:
    """Stop everything the lab runs (by PID), remove its namespaces and its directory."""
    from svlab import nslab
    try:
        nslab.down(labdir)
    except SvmotionError as err:
        die(err)
    click.echo(f"svlab: lab in {labdir} removed")


@lab.command("status")
@click.option("--json", "as_json", is_flag=True, help="The units' records as JSON.")
@click.pass_obj
def status_cmd(labdir: Path, as_json: bool) -> None:
    """The lab's hosts and units: PID, restarts, last exit."""
    from svlab import nslab
    try:
        ns = nslab.load(labdir)
    except SvmotionError as err:
        die(err)
    units = ns.units()
    if as_json:
        click.echo(json.dumps(units, indent=1))
        return
    click.echo(ns.summary())
    for name, rec in units.items():
        state = f"running, pid {rec['pid']}" if rec.get("pid") else f"stopped (last exit {rec.get('last_exit')})"
        click.echo(f"  {name:40} {state}, restarts {rec.get('restarts', 0)}")


@lab.command("migrate", context_settings={"ignore_unknown_options": True})
@click.option("--to", "direction", type=click.Choice(["both", "dst", "src"]), default="both", show_default=True,
              help="dst: only there; src: only back (after a --to dst); both: there and back.")
@click.option("--name", default=None, help="The directory on both sides (default: a time stamp; reuse it for --to src).")
@click.argument("options", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def migrate_cmd(labdir: Path, direction: str, name: str | None, options: tuple[str, ...]) -> None:
    """Migrate the guest's disk from src to dst and back (vagrant/migrate.sh; OPTIONS go to svmotion migrate)."""
    from svlab import nslab
    if direction == "src" and not name:
        raise click.BadParameter("--to src needs the --name of the migration there", param_hint="--name")
    steps = {"both": ("there", "back"), "dst": ("there",), "src": ("back",)}[direction]
    try:
        sys.exit(nslab.migrate(labdir, steps, name or time.strftime("%Y%m%d-%H%M%S"), options))
    except SvmotionError as err:
        die(err)


@lab.command("query")
@click.argument("expr")
@click.pass_obj
def query_cmd(labdir: Path, expr: str) -> None:
    """An instant PromQL query to mon's Prometheus, e.g. 'ALERTS' or 'svmotion_dirty_bytes'."""
    from svlab import nslab
    try:
        result = nslab.load(labdir).prometheus("query", query=expr)["result"]
    except SvmotionError as err:
        die(err)
    for series in result:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(series["metric"].items()))
        click.echo(f"{{{labels}}} {series['value'][1]}")
