"""`svmotion tls init DIR --host NAME...`: the certificates for migrations between hosts.

Thin command over agent/certs.py; agent/cli.py adds it with `main.add_command(tls)`. A bad host
name is a usage error (exit 2); files in the way without --force, or a CA that cannot be read,
are a refusal (exit 3) that wrote nothing.
"""
from __future__ import annotations

from pathlib import Path

import click

from agent.errors import Refused, SvmotionError, die


def _host(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list:
    from agent.certs import parse_host
    try:
        return [parse_host(v) for v in values]
    except ValueError as err:
        raise click.BadParameter(f"{err}; e.g. --host hostb or --host hostb,192.0.2.2", ctx, param) from None


@click.group("tls")
def tls() -> None:
    """TLS certificates for migrations between hosts (mutual TLS, one CA)."""


@tls.command("init")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--host", "hosts", multiple=True, required=True, callback=_host, metavar="NAME[,NAME...]",
              help="A host to certify (repeat for each). Its first name names DIR/NAME; every name (host "
                   "names, IP addresses) goes into its certificate.")
@click.option("--days", type=click.IntRange(1, 36500), default=3650, show_default=True,
              help="How long the certificates are valid.")
@click.option("--force", is_flag=True, help="Overwrite the hosts' existing files (an existing CA is always kept).")
def init_cmd(directory: str, hosts: list, days: int, force: bool) -> None:
    """Write a CA (unless DIR has one) and a key and certificate per host in DIR/NAME/.

    Each DIR/NAME/ is laid out as nbdkit --tls-certificates and libnbd expect (ca-cert.pem,
    server-cert.pem, server-key.pem, client-cert.pem, client-key.pem): copy it to that host and
    point its agent's [tls] dir at it. DIR/ca-key.pem signs certificates and stays where it is.

    Example: svmotion tls init /etc/svmotion/tls --host hosta --host hostb,192.0.2.2
    """
    from agent.certs import init
    try:
        for line in init(Path(directory), hosts, days=days, force=force):
            click.echo(line)
    except SvmotionError as err:
        die(err)
    except (OSError, ValueError) as err:
        die(Refused(f"cannot write the certificates in {directory!r}: {getattr(err, 'strerror', None) or err}; "
                    f"check the directory and its permissions"))
