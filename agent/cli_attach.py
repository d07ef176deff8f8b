"""`svmotion attach VM DISK` and `svmotion detach DEVICE`: a VM's disk as a kernel block device.

Design notes
- Thin commands over agent/attach.py; agent/cli.py adds them with `main.add_command`.
- The export is found from the agent's configuration (the VM's NBD socket; `--config` or
  SVMOTION_CONFIG), or given directly with `--uri` (the lab guest has no configuration: it
  reaches the host's nbdkit over TCP).
- stdout carries the device alone (or JSON with --json), so `DEV=$(svmotion attach vm1 disk0)`
  works; how it was attached (kernel netlink, or the nbdfuse + loop fallback and why) goes to
  stderr, so it is still said on a terminal.
- This module runs standalone too (`python -m agent.cli_attach attach ...`), without the rest
  of the CLI's dependencies: that is how the lab guest runs it.
"""
from __future__ import annotations

import json

import click

from agent.attach import DEFAULT_STATE_DIR, METHODS, Export, attach, detach, unix_uri
from agent.errors import Refused, SvmotionError, die

STATE_DIR_OPTION = click.option(
    "--state-dir", envvar="SVMOTION_ATTACH_DIR", default=DEFAULT_STATE_DIR, show_default=True,
    help="Where attachments are recorded (env SVMOTION_ATTACH_DIR).")


def resolve_export(vm: str, disk: str, config_path: str | None, uri: str | None) -> Export:
    """VM + disk -> Export, from --uri or from the VM's socket in the agent's configuration."""
    if uri:
        return Export(vm, disk, uri)
    if not config_path:
        raise click.UsageError("say where the VM's disks are served: --config FILE (the agent's "
                               "configuration, or env SVMOTION_CONFIG) or --uri nbd+unix:///DISK?socket=PATH")
    from agent.config import load_config
    config = load_config(config_path)
    vm_config = config.vm(vm)
    if vm_config is None:
        known = ", ".join(v.name for v in config.vms)
        raise Refused(f"unknown VM {vm!r}: {config_path} describes {known}")
    if disk not in [d.name for d in vm_config.disks]:
        known = ", ".join(d.name for d in vm_config.disks)
        raise Refused(f"VM {vm!r} has no disk {disk!r}; its disks are {known}")
    return Export(vm, disk, unix_uri(vm_config.socket, disk))


@click.command("attach")
@click.argument("vm")
@click.argument("disk")
@click.option("--config", "config_path", envvar="SVMOTION_CONFIG", type=click.Path(dir_okay=False),
              help="The agent's TOML configuration, to find the VM's NBD socket (env SVMOTION_CONFIG).")
@click.option("--uri", help="The export's NBD URI instead of the configuration, e.g. nbd://10.0.2.2:10809/disk0.")
@click.option("--method", type=click.Choice(METHODS), default="auto", show_default=True,
              help="netlink: the kernel's nbd client; nbdfuse: nbdfuse + loop; auto: netlink if the kernel has nbd.")
@click.option("--connections", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Sockets for the kernel client (used when the server allows multi-conn).")
@STATE_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the attachment as JSON.")
def attach_cmd(vm: str, disk: str, config_path: str | None, uri: str | None, method: str,
               connections: int, state_dir: str, as_json: bool) -> None:
    """Attach DISK of VM as a block device and print its path (idempotent)."""
    try:
        att = attach(resolve_export(vm, disk, config_path, uri), state_dir, method, connections)
    except SvmotionError as err:
        die(err)
    if as_json:
        click.echo(json.dumps(att.summary()))
    else:
        click.echo(att.device)
    if att.created:
        how = "kernel nbd (netlink)" if att.method == "netlink" else "nbdfuse + loop"
        click.echo(f"svmotion: attached {vm}/{disk} at {att.device} via {how} ({att.reason})", err=True)
    elif att.method == "netlink":
        click.echo(f"svmotion: {vm}/{disk} was already attached at {att.device}; its connection was "
                   f"renewed if it had died (a healthy one is left as it is)", err=True)
    else:
        click.echo(f"svmotion: {vm}/{disk} was already attached at {att.device}; nothing changed", err=True)


@click.command("detach")
@click.argument("device")
@STATE_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print what was detached as JSON.")
def detach_cmd(device: str, state_dir: str, as_json: bool) -> None:
    """Detach DEVICE made by `svmotion attach` (idempotent: a detached device is not an error)."""
    try:
        att = detach(device, state_dir)
    except SvmotionError as err:
        die(err)
    if as_json:
        click.echo(json.dumps({"device": device, "detached": att is not None,
                               **(att.summary() if att else {})}))
    elif att is None:
        click.echo(f"{device}: not attached; nothing to do")
    else:
        click.echo(f"{att.device}: detached {att.vm}/{att.disk}")


@click.group()
def standalone() -> None:
    """attach/detach without the rest of the svmotion CLI (used inside the lab guest)."""


standalone.add_command(attach_cmd)
standalone.add_command(detach_cmd)

if __name__ == "__main__":
    standalone()
