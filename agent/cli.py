"""The `svmotion` command line: a click group; each command talks to the agent over its socket.

Design notes
- Every command is thin: parse and check options here (usage errors, exit 2, quoting the value
  and the fix), send one request to the agent, print its answer. Refusals come from the agent
  with their exit code (docs/interfaces.md, section 5) and are printed as they are.
- Other modules add their commands with `main.add_command(cmd)` (kernel attach, reports, bench).
- `migrate` waits by default, drawing progress on stderr; the result goes to stdout (a table, or
  the record as JSON with --json) and the exit code says how it ended (0, 5 failed, 6 aborted,
  8 verification failed after the switchover). `verify` waits for the agent's comparison and
  exits 0 on a match, 8 otherwise.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any, Callable

import click

from agent.config import DEFAULT_AGENT_SOCKET, load_config
from agent.convergence import MAX_BOUND_S
from agent.errors import (EXIT_INTERNAL, EXIT_OK, EXIT_VERIFY, AgentUnreachable, SvmotionError, die,
                          exit_code_of)
from agent.jsonlines import JsonLinesClient, RemoteError
from agent.plan import MIRROR_MODES, STRATEGIES, human_bytes, parse_destination
from agent.progress import Progress, change_line, outcome_line, phase_table, render_line
from agent.verify import verify_line
from nbd_plugin.dirtymap import MAX_GRANULARITY, MIN_GRANULARITY

POLL_S = 0.25
AGENT_RESTART_PATIENCE_S = 60.0
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|us)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'50M' -> 52428800 (K, M, G, T are powers of 1024; 'MiB', 'MB' accepted); raises ValueError."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(text)
    scale = 1024 ** " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * scale)


def parse_duration(text: str) -> float:
    """'50ms' -> 0.05, '0.2s' -> 0.2, '1' -> 1.0 seconds; raises ValueError."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(text)
    unit = (m.group(2) or "s").lower()
    return float(m.group(1)) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]


class Size(click.ParamType):
    name = "SIZE"

    def __init__(self, minimum: int = 0, maximum: int | None = None, power_of_two: bool = False):
        self.minimum, self.maximum, self.power_of_two = minimum, maximum, power_of_two

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        try:
            n = parse_size(value)
        except ValueError:
            self.fail(f"{value!r} is not a size; write bytes with an optional K, M or G suffix, e.g. 50M",
                      param, ctx)
        too_big = self.maximum is not None and n > self.maximum
        if n < self.minimum or too_big or (self.power_of_two and n & (n - 1)):
            rule = "a power of two " if self.power_of_two else ""
            limit = f" and <= {human_bytes(self.maximum)}" if self.maximum is not None else ""
            self.fail(f"{value!r} must be {rule}>= {human_bytes(self.minimum)}{limit}, e.g. 64K", param, ctx)
        return n


def directory(fix: str) -> Callable[[click.Context, click.Parameter, str], str]:
    """An option naming a directory for the agent: absolute (the agent has another working
    directory), never empty (abspath("") would be the current one). `fix` says what to give."""
    def check(ctx: click.Context, param: click.Parameter, value: str) -> str:
        if not value.strip():
            raise click.BadParameter(f"{value!r} is empty; {fix}", ctx, param)
        return os.path.abspath(value)
    return check


def destination_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--dest: HOST:/path as it is (agent/plan.py `parse_destination`), a local directory made absolute."""
    if value.strip() and not value.startswith("/"):
        try:
            if parse_destination(value).remote:
                return value
        except ValueError as err:
            if ":" in value.split("/", 1)[0]:       # meant as HOST:..., so not a local path
                raise click.BadParameter(f"{value!r}: {err}", ctx, param) from None
    return directory("give the destination directory, e.g. --dest /mnt/new, or HOST:/path")(ctx, param, value)


class Duration(click.ParamType):
    """Seconds written as 50ms, 0.2s or 1, within (minimum, maximum] (or [0, maximum] with `zero`)."""

    name = "DURATION"

    def __init__(self, maximum: float = 10.0, zero: bool = False, example: str = "50ms"):
        self.maximum, self.zero, self.example = maximum, zero, example

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, float):
            return value
        try:
            seconds = parse_duration(value)
        except ValueError:
            self.fail(f"{value!r} is not a duration; write e.g. {self.example} or 0.2s", param, ctx)
        if not (0 <= seconds if self.zero else 0 < seconds) or seconds > self.maximum:
            low = "at least 0" if self.zero else "more than 0"
            self.fail(f"{value!r} must be {low} and at most {self.maximum:g} s, e.g. {self.example}", param, ctx)
        return seconds


MIRROR_HELP = ("sync: a guest write is acknowledged once both sides have it; async: once the source has "
               "it, the destination gets it in the background (for slow or remote destinations); dirty: "
               "track dirty chunks and copy them in passes.")
MAX_THROTTLE = Duration(maximum=MAX_BOUND_S, zero=True, example="5ms")
MAX_THROTTLE_HELP = ("The most a guest write may be delayed so that the migration converges (0 to 1 s; 0: "
                     "never delay, only report a migration that does not converge).")


def agent_call(ctx: click.Context, op: str, timeout: float = 30.0, patience: float = 0.0,
               **args: Any) -> dict[str, Any]:
    """One request to the agent; unreachable -> exit 4, refusal -> its own line and exit code.

    `patience`: seconds to keep trying while the agent is unreachable (it may be restarting).
    """
    path = ctx.obj["socket"]
    deadline = time.monotonic() + patience
    while True:
        try:
            with JsonLinesClient(path, timeout=timeout) as client:
                return client.call(op, **args)
        except RemoteError as err:
            die(SvmotionError(str(err.reply.get("error", err)), int(err.reply.get("exit", EXIT_INTERNAL))))
        except (OSError, ConnectionError) as err:
            if time.monotonic() >= deadline:
                die(AgentUnreachable(path, getattr(err, "strerror", None) or str(err)))
            time.sleep(POLL_S)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn SvmotionError raised by a command into its one line and exit code."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SvmotionError as err:
            die(err)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--agent-socket", envvar="SVMOTION_SOCKET", default=DEFAULT_AGENT_SOCKET, show_default=True,
              help="The agent's API socket (env SVMOTION_SOCKET).")
@click.pass_context
def main(ctx: click.Context, agent_socket: str) -> None:
    """svmotion: move a running VM's disks to new storage with stuns of milliseconds."""
    ctx.ensure_object(dict)
    ctx.obj["socket"] = agent_socket


@main.command("agent")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The agent's TOML configuration (VMs, disks, sockets).")
@guarded
def agent_cmd(config_path: str) -> None:
    """Run the agent: supervise one nbdkit per VM, run migrations, serve /metrics."""
    from agent.daemon import run_agent
    sys.exit(run_agent(load_config(config_path)))


@main.command()
@click.argument("vm")
@click.option("--dest", required=True, callback=destination_option, metavar="DIR|HOST:/DIR",
              help="Destination directory for the disks and files: a directory of this host, or HOST:/DIR "
                   "(HOST:PORT:/DIR, [IPV6]:/DIR) in a datastore of another svmotion host.")
@click.option("--stun-strategy", "strategy", type=click.Choice(STRATEGIES), default="optimized",
              show_default=True, help="optimized: disks stay open under the stun; legacy: close and reopen.")
@click.option("--rate", type=Size(), default="0", help="Copy rate limit in bytes/s, e.g. 50M (0 = unlimited).")
@click.option("--mirror", type=click.Choice(MIRROR_MODES), default="sync", show_default=True, help=MIRROR_HELP)
@click.option("--granularity", type=Size(minimum=MIN_GRANULARITY, maximum=MAX_GRANULARITY, power_of_two=True),
              default="64K", show_default=True, help="Dirty-map chunk size (4K to 64M).")
@click.option("--stun-budget", type=Duration(), default="50ms", show_default=True,
              help="The switchover stun to aim for: dirty passes repeat until the rest fits.")
@click.option("--max-throttle", type=MAX_THROTTLE, default="5ms", show_default=True, help=MAX_THROTTLE_HELP)
@click.option("--delete-source", is_flag=True, help="Delete the source files after a successful migration "
              "(with --verify: only after a match).")
@click.option("--verify", is_flag=True, help="After the switchover, compare each destination with its frozen source "
              "by per-chunk digests (exit 8 on a difference).")
@click.option("--no-wait", is_flag=True, help="Start the migration and return at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the migration record as JSON.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write the full record (phases, stuns, passes, timeline samples) to this JSON file.")
@click.pass_context
def migrate(ctx: click.Context, vm: str, dest: str, strategy: str, rate: int, mirror: str, granularity: int,
            stun_budget: float, max_throttle: float, delete_source: bool, verify: bool, no_wait: bool,
            as_json: bool, report_path: str | None) -> None:
    """Migrate VM's disks to the directory DEST while it runs.

    Partial disks a migration to DEST left when its nbdkit died are resumed: only the chunks that
    differ from the source are copied again. When what remains to copy stops shrinking, the guest's
    writes are delayed (at most --max-throttle each) until it does; a migration that would need
    more says so once and goes on: then choose with `svmotion set` or `svmotion abort`."""
    reply = agent_call(ctx, "migrate", vm=vm, dest=dest, strategy=strategy, rate=rate,
                       mirror=mirror, granularity=granularity, stun_budget=stun_budget,
                       max_throttle=max_throttle, delete_source=delete_source, verify=verify)
    record = reply["migration"]
    if no_wait:
        click.echo(json.dumps(record, indent=1) if as_json else
                   f"{vm}: migration {record['id']} started; follow it with `svmotion status {vm}`")
        return
    record = wait_for(ctx, vm, record["id"], Progress(), with_samples=report_path is not None)
    if report_path:
        with open(report_path, "w") as f:
            json.dump(record, f, indent=1)
    if as_json:
        click.echo(json.dumps({k: v for k, v in record.items() if k != "samples"}, indent=1))
    else:
        click.echo(phase_table(record))
        click.echo(outcome_line(record))
    for warning in record.get("warnings") or []:
        click.echo(f"svmotion: warning: {warning}", err=True)
    if record["state"] != "success":
        click.echo(f"svmotion: error: {outcome_line(record)}", err=True)
    sys.exit(exit_code_of(record))


def wait_for(ctx: click.Context, vm: str, migration_id: str, progress: Progress,
             with_samples: bool = False) -> dict[str, Any]:
    """Poll the agent until the migration ends; return its final record."""
    try:
        while True:
            # An agent that restarts (systemd, an operator) resumes the migration: wait for it.
            state = agent_call(ctx, "status", patience=AGENT_RESTART_PATIENCE_S, vm=vm,
                               samples=with_samples)["vms"][0]
            running, last = state.get("migration"), state.get("last")
            if running and running["id"] == migration_id:
                progress.update(running)
            elif last and last.get("id") == migration_id:
                progress.close()
                return last
            else:
                progress.close()
                die(SvmotionError(f"migration {migration_id} of {vm!r} is no longer known to the agent "
                                  f"(was it restarted?); see `svmotion status {vm}`", EXIT_INTERNAL))
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        progress.close()
        click.echo(f"svmotion: detached; migration {migration_id} continues in the agent "
                   f"(`svmotion status {vm}` to follow, `svmotion abort {vm}` to stop it)", err=True)
        sys.exit(130)


@main.command()
@click.argument("vm", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the agent's answer as JSON.")
@click.pass_context
def status(ctx: click.Context, vm: str | None, as_json: bool) -> None:
    """Show each VM: its nbdkit, its disks, a running migration and the last one."""
    reply = agent_call(ctx, "status", **({"vm": vm} if vm else {}))
    if as_json:
        click.echo(json.dumps(reply["vms"], indent=1))
        return
    for state in reply["vms"]:
        up = f"nbdkit pid {state['nbdkit_pid']}" if state.get("nbdkit_up") else "nbdkit DOWN"
        click.echo(f"{state['name']}: {up}")
        for disk in state["disks"]:
            click.echo(f"  {disk['name']}: {disk['path']}")
        if state.get("migration"):
            click.echo(f"  migrating: {render_line(state['migration'], tty=True)}")
        if state.get("last"):
            click.echo(f"  last: {outcome_line(state['last'])}")


@main.command()
@click.argument("vm")
@click.pass_context
def abort(ctx: click.Context, vm: str) -> None:
    """Abort VM's migration: it goes on running on its intact source."""
    record = agent_call(ctx, "abort", vm=vm, timeout=60.0)["migration"]
    click.echo(outcome_line(record))


@main.command("set")
@click.argument("vm")
@click.option("--rate", type=Size(), default=None, help="Copy rate limit in bytes/s, e.g. 50M (0 = unlimited).")
@click.option("--mirror", type=click.Choice(MIRROR_MODES), default=None, help=MIRROR_HELP)
@click.option("--max-throttle", type=MAX_THROTTLE, default=None, help=MAX_THROTTLE_HELP)
@click.option("--stun-budget", type=Duration(), default=None,
              help="The switchover stun to aim for, e.g. 50ms.")
@click.option("--json", "as_json", is_flag=True, help="Print the changes and the migration record as JSON.")
@click.pass_context
def set_cmd(ctx: click.Context, vm: str, rate: int | None, mirror: str | None, max_throttle: float | None,
            stun_budget: float | None, as_json: bool) -> None:
    """Change VM's running migration: its mirror mode, copy rate, throttle bound or stun budget.

    Every change applies at once, without a stun (a mirror mode switch in either direction too),
    and is recorded in the migration's record and report. Refused (exit 3) when VM is not
    migrating or has already switched to its destination."""
    wanted = {"mirror": mirror, "rate": rate, "max_throttle": max_throttle, "stun_budget": stun_budget}
    if all(v is None for v in wanted.values()):
        raise click.UsageError("nothing to change; give one or more of --rate, --mirror, --max-throttle, "
                               "--stun-budget")
    reply = agent_call(ctx, "set", vm=vm, **{k: v for k, v in wanted.items() if v is not None})
    if as_json:
        click.echo(json.dumps(reply, indent=1))
    elif not reply["changes"]:
        click.echo(f"{vm}: nothing changed: the migration already runs with these settings")
    for change in [] if as_json else reply["changes"]:
        click.echo(f"{vm}: {change_line(change)}")


@main.command("verify")
@click.argument("vm")
@click.option("--against", required=True, metavar="DIR",
              callback=directory("give the directory holding the reference <disk>.raw files"),
              help="Directory holding the reference disks as <disk>.raw, e.g. the source directory after a "
                   "migration.")
@click.option("--granularity", type=Size(minimum=MIN_GRANULARITY, maximum=MAX_GRANULARITY, power_of_two=True),
              default="64K", show_default=True, help="Chunk size of the digests (4K to 64M).")
@click.option("--json", "as_json", is_flag=True, help="Print the verification record as JSON.")
@click.pass_context
def verify_cmd(ctx: click.Context, vm: str, against: str, granularity: int, as_json: bool) -> None:
    """Compare VM's disks, as served now, with DIR/<disk>.raw by per-chunk digests.

    Chunks the guest rewrote since the VM's last switchover are skipped. Exit 0: they match;
    8: they differ (the first differing disk and offset are printed)."""
    record = agent_call(ctx, "verify", timeout=None, vm=vm, against=against,
                        granularity=granularity)["verification"]
    click.echo(json.dumps(record, indent=1) if as_json else f"{vm}: {verify_line(record)}")
    if record["result"] != "match":
        click.echo(f"svmotion: error: {vm}: {verify_line(record)}", err=True)
    sys.exit(EXIT_OK if record["result"] == "match" else EXIT_VERIFY)


@main.command()
@click.option("--keep", is_flag=True, help="Keep the temporary directory (for a look afterwards).")
@guarded
def demo(keep: bool) -> None:
    """Build a two-disk VM, migrate it under a verifying writer, print phases and stun times."""
    from svlab.demo import run_demo
    sys.exit(run_demo(keep=keep))


from agent.cli_report import report  # noqa: E402  (svmotion report FILE.json --png OUT.png)
main.add_command(report)
from agent.cli_attach import attach_cmd, detach_cmd  # noqa: E402  (svmotion attach VM DISK, detach DEVICE)
main.add_command(attach_cmd)
main.add_command(detach_cmd)
from agent.cli_tls import tls  # noqa: E402  (svmotion tls init DIR --host NAME...)
main.add_command(tls)


if __name__ == "__main__":
    main()
