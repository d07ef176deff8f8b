"""Item 6: bad input gets one clear line and a documented exit code, and changes nothing.

The agent API is also fed random requests (Hypothesis) on a real agent; the agent must answer each
with one reply, refuse every bad one with its exit code, start nothing, and keep its fds and
threads. Random requests are kept from doing harm: a `dest` that exists on this machine is never
sent (a valid migrate would copy the VM there), and `shutdown` is only sent with a `stop_vms`
that is not a boolean.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.jsonlines import JsonLinesClient
from agentproc import cli_argv

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]


def snapshot(vm, *dirs: Path) -> dict:
    """What must not change: files in the directories (name, size, mtime), the plugin's disks, no migration."""
    files = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for d in dirs for p in sorted(d.iterdir())}
    disks = {n: (d["state"], d["path"], d["dest"]) for n, d in vm.plugin("status")["disks"].items()}
    st = vm.status()
    return {"files": files, "disks": disks, "migration": st["migration"], "last": st["last"]}


def refused(done: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stdout + done.stderr
    assert len(lines) == 1 and lines[0].startswith("svmotion: error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_refusals_change_nothing(agent_vm, dest_dir: Path, small_tmpfs) -> None:
    vm = agent_vm(n_disks=2)
    src = next(iter(vm.disks.values())).parent
    (dest_dir / "disk1.raw").write_bytes(b"keep me")
    tiny = small_tmpfs(1 * MiB)
    empty = dest_dir.parent / "empty"
    empty.mkdir()
    before = snapshot(vm, src, dest_dir, tiny, empty)
    cases = [
        (["migrate", "vm9", "--dest", str(empty)], 3, ["unknown VM 'vm9'", "vm1"]),
        (["migrate", vm.name, "--dest", str(src)], 3, ["is the directory of the source disk"]),
        (["migrate", vm.name, "--dest", str(dest_dir)], 3, [str(dest_dir / "disk1.raw"), "already exists"]),
        (["migrate", vm.name, "--dest", str(tiny)], 3, [str(tiny), "free", "choose another --dest"]),
        (["migrate", vm.name, "--dest", str(empty / "nope")], 3, ["is not a directory", "mkdir"]),
        (["migrate", vm.name, "--dest", str(empty), "--rate", "fast"], 2, ["'fast'", "50M"]),
        (["migrate", vm.name, "--dest", str(empty), "--granularity", "3000"], 2, ["'3000'", "power of two"]),
        (["migrate", vm.name, "--dest", str(empty), "--granularity", "1T"], 2, ["'1T'", "64.0 MiB"]),
        (["migrate", vm.name, "--dest", str(empty), "--stun-budget", "1h"], 2, ["'1h'", "50ms"]),
        (["migrate", vm.name, "--dest", str(empty), "--max-throttle", "5"], 2, ["'5'", "at most 1 s", "5ms"]),
        (["abort", "vm9"], 3, ["unknown VM 'vm9'"]),
        (["set", vm.name, "--mirror", "async"], 3, ["VM 'vm1' is not migrating"]),
        (["set", "vm9", "--rate", "1M"], 3, ["unknown VM 'vm9'"]),
        (["set", vm.name], 2, ["nothing to change", "--max-throttle"]),
        (["set", vm.name, "--max-throttle", "2s"], 2, ["'2s'", "at most 1 s"]),
        (["set", vm.name, "--mirror", "later"], 2, ["'later'", "async"]),
    ]
    for args, code, words in cases:
        done = vm.cli(*args)
        if code == 2:     # click's usage errors: the usage lines, then one "Error:" line
            assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("Error: ")
            assert all(w in done.stderr for w in words), done.stderr
        else:
            refused(done, code, *words)
    assert snapshot(vm, src, dest_dir, tiny, empty) == before
    assert (dest_dir / "disk1.raw").read_bytes() == b"keep me"


def test_missing_source_file(agent_vm, dest_dir: Path) -> None:
    vm = agent_vm(n_disks=1)
    vm.files[0].unlink()
    refused(vm.cli("migrate", vm.name, "--dest", str(dest_dir)), 3, str(vm.files[0]), "missing")
    vm.sidecars["disk0"][0].unlink()
    vm.files[0].write_bytes(b"back")
    refused(vm.cli("migrate", vm.name, "--dest", str(dest_dir)), 3, str(vm.sidecars["disk0"][0]), "missing")
    assert list(dest_dir.iterdir()) == []


def test_second_migration_while_migrating(agent_vm, dest_dir: Path, tmp_path: Path) -> None:
    vm = agent_vm(n_disks=1, inject="pause:DiskCopy")
    other = tmp_path / "other"
    other.mkdir()
    assert vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--no-wait").returncode == 0
    vm.wait_phase("DiskCopy")
    refused(vm.cli("migrate", vm.name, "--dest", str(other)), 3, "already migrating", "svmotion abort vm1")
    assert list(other.iterdir()) == []
    assert vm.cli("abort", vm.name).returncode == 0


def test_agent_unreachable(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "agent.cli", "--agent-socket", str(tmp_path / "no.sock"),
                           "status"], cwd=ROOT, capture_output=True, text=True)
    refused(done, 4, "cannot reach the agent", str(tmp_path / "no.sock"))


@pytest.mark.parametrize("mutate, words", [
    (lambda t: t.replace("[[vm.disk]]", "[[vm.disks]]", 1), ["unknown key 'disks'"]),
    (lambda t: t + "\n[agent\n", ["not valid TOML"]),
    (lambda t: t.replace('metrics = "127.0.0.1:0"', 'metrics = "localhost"'), ["'localhost'", "host:port"]),
    (lambda t: t.replace("disk0.raw", "gone.raw"), ["gone.raw", "does not exist"]),
])
def test_bad_config_file(agent_vm, mutate, words: list[str]) -> None:
    """`svmotion agent` with a bad config: exit 7, one line naming the value; nothing started."""
    vm = agent_vm(n_disks=1, start=False)
    vm.config.write_text(mutate(vm.config.read_text()))
    done = subprocess.run([sys.executable, "-m", "agent.cli", "agent", "--config", str(vm.config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    refused(done, 7, str(vm.config), *words)
    assert vm.nbdkit_pid() is None and not vm.socket.exists()


def api(vm, request: dict[str, Any]) -> dict[str, Any]:
    """One raw request to the agent API; its reply, ok or not."""
    with JsonLinesClient(str(vm.socket), timeout=60) as c:
        return c.call_raw(json.dumps(request))


def api_refused(vm, request: dict[str, Any], code: int, *words: str) -> None:
    reply = api(vm, request)
    assert reply["ok"] is False and reply["exit"] == code, f"{request}: {reply}"
    assert "\n" not in reply["error"], reply
    for word in words:
        assert word in reply["error"], reply["error"]


def test_api_arguments_of_the_wrong_type_are_refused_and_nothing_happens(agent_vm, dest_dir: Path) -> None:
    """Defect 2: "false" is not false; an unknown key is not ignored; a relative dest is refused."""
    vm = agent_vm(n_disks=2)
    src = next(iter(vm.disks.values())).parent
    before = snapshot(vm, src, dest_dir)
    pid = vm.nbdkit_pid()
    go = {"op": "migrate", "vm": vm.name, "dest": str(dest_dir)}
    api_refused(vm, {**go, "delete_source": "false"}, 2, "delete_source", "'false'", "true or false")
    api_refused(vm, {**go, "delete_sorce": True}, 2, "unknown argument 'delete_sorce'", "delete_source")
    api_refused(vm, {**go, "rate": "50M"}, 2, "rate", "'50M'", "an integer")
    api_refused(vm, {**go, "granularity": 1 << 40}, 2, "granularity", "1099511627776", "67108864")
    api_refused(vm, {**go, "stun_budget": True}, 2, "stun_budget", "a number")
    api_refused(vm, {**go, "dest": "   "}, 2, "dest", "--dest /mnt/new")
    api_refused(vm, {**go, "dest": "relative/dir"}, 2, "'relative/dir'", "absolute path")
    api_refused(vm, {**go, "vm": ["vm1"]}, 2, "vm", "a string")
    api_refused(vm, {"op": "status", "samples": "false"}, 2, "samples", "'false'")
    api_refused(vm, {"op": "status", "vm": None}, 2, "vm", "not null")
    api_refused(vm, {"op": "abort", "vm": vm.name, "force": True}, 2, "unknown argument 'force'")
    api_refused(vm, {"op": "shutdown", "stop_vms": "false"}, 2, "stop_vms", "'false'", "true or false")
    assert vm.proc.poll() is None, "a refused shutdown stopped the agent"
    assert vm.nbdkit_pid() == pid and vm.status()["nbdkit_up"], "a refused shutdown stopped nbdkit"
    assert snapshot(vm, src, dest_dir) == before


def test_an_empty_dest_is_a_usage_error(agent_vm, tmp_path: Path) -> None:
    """Defect 3: `--dest ""` meant the current directory; run from an empty one to see nothing lands."""
    vm = agent_vm(n_disks=1)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for dest in ("", "  "):
        done = subprocess.run(cli_argv(vm.socket, "migrate", vm.name, "--dest", dest), cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: ") and f"{dest!r}" in last and "--dest /mnt/new" in last, last
    assert list(cwd.iterdir()) == [] and vm.status()["last"] is None


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_files_are_private(agent_vm, dest_dir: Path) -> None:
    """Defect 6: the state files name every disk path; only the agent's user may read them."""
    vm = agent_vm(n_disks=1, size=4 * MiB, start=False)
    log = vm.state / f"{vm.name}.nbdkit.log"
    os.chmod(vm.state, 0o755)                  # as an older agent or a careless mkdir left them
    log.write_text("an older agent's log\n")
    os.chmod(log, 0o644)
    vm.start("hold:DiskCopy=2")
    assert vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--no-wait").returncode == 0
    vm.wait_phase("DiskCopy")
    journal = vm.state / f"{vm.name}.migration.json"
    assert journal.exists() and mode(journal) == 0o600, oct(mode(journal))
    assert vm.wait_done()["state"] == "success"
    files = {p.name: oct(mode(p)) for p in vm.state.iterdir() if p.is_file() and not p.is_socket()}
    assert {f"{vm.name}.pid", f"{vm.name}.nbdkit.log", f"{vm.name}.paths.json"} <= files.keys(), files
    assert all(m == "0o600" for m in files.values()), files
    assert mode(vm.state) == 0o700, oct(mode(vm.state))


# ---- random requests ----------------------------------------------------------------------------

API_OPS = {"migrate": ["vm", "dest", "strategy", "rate", "mirror", "granularity", "stun_budget",
                       "delete_source", "max_throttle"],
           "status": ["vm", "samples"], "abort": ["vm"], "set": ["vm", "mirror", "rate", "max_throttle", "stun_budget"]}
API_KEYS = sorted({k for keys in API_OPS.values() for k in keys} | {"stop_vms"})
API_WORDS = ["vm1", "vm9", "optimized", "legacy", "sync", "dirty", "false", "true", "", "  ", "rel/dir",
             "/nonexistent/dest", "a\0b", "\ud800"]
api_leaves = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=10) |
              st.sampled_from(API_WORDS) | st.sampled_from([0, 1, 0.05, 4096, 65536, 3000, 1 << 40, -1, 11]))
api_values = st.recursive(api_leaves, lambda inner: st.lists(inner, max_size=3) |
                          st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


# Good values of each argument: a request is built of good ones and then spoiled in one place, so
# that every check is reached, not only the first. No good dest exists (see the module notes).
API_GOOD = {"vm": st.just("vm1"), "dest": st.just("/nonexistent/dest"),
            "strategy": st.sampled_from(["optimized", "legacy"]), "rate": st.integers(0, 1 << 40),
            "mirror": st.sampled_from(["sync", "async", "dirty"]),
            "granularity": st.sampled_from([4096, 65536, 64 * MiB]),
            "stun_budget": st.sampled_from([0.05, 1, 10]), "delete_source": st.booleans(),
            "max_throttle": st.sampled_from([0, 0.005, 1]), "samples": st.booleans()}


@st.composite
def api_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A known op with good arguments, mostly with one of them spoiled or a stray one added;
    sometimes an unknown op. shutdown only with a stop_vms that is not a boolean (else it would
    stop the agent)."""
    choice = draw(st.integers(0, 11))
    if choice == 0:
        return {"op": "shutdown", "stop_vms": draw(api_values.filter(lambda v: not isinstance(v, bool)))}
    op = draw(st.sampled_from(sorted(API_OPS)) if choice > 1 else st.text(max_size=10) | api_values)
    keys = API_OPS.get(op, []) if isinstance(op, str) else []
    args = {key: draw(API_GOOD[key]) for key in keys if key in ("vm", "dest") or draw(st.booleans())}
    spoil = draw(st.integers(0, 3))
    if spoil == 1 and args:
        args[draw(st.sampled_from(sorted(args)))] = draw(api_values)
    elif spoil == 2:
        args[draw(st.sampled_from(API_KEYS) | st.text(max_size=8))] = draw(api_values)
    elif spoil == 3 and args:
        del args[draw(st.sampled_from(sorted(args)))]
    return {**args, "op": op}


def test_random_api_requests_get_one_reply_and_change_nothing(agent_vm, dest_dir: Path, testlib) -> None:
    vm = agent_vm(n_disks=2, size=4 * MiB)
    src = next(iter(vm.disks.values())).parent
    before = snapshot(vm, src, dest_dir)
    agent_pid, nbdkit_pid = vm.proc.pid, vm.nbdkit_pid()

    def counts() -> tuple[tuple[int, int], tuple[int, int]]:
        return testlib.fds_and_threads(agent_pid), testlib.fds_and_threads(nbdkit_pid)

    start = testlib.steady_fds_and_threads(agent_pid), testlib.steady_fds_and_threads(nbdkit_pid)

    @settings(derandomize=True, deadline=None, database=None, max_examples=100,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(st.lists(api_requests(), min_size=1, max_size=4))
    def example(batch: list[dict[str, Any]]) -> None:
        # Never a destination that exists: a valid migrate would copy the VM into it.
        assume(not any(isinstance(r.get("dest"), str) and os.path.lexists(r["dest"]) for r in batch))
        with JsonLinesClient(str(vm.socket), timeout=30) as c:
            for request in batch:
                reply = c.call_raw(json.dumps(request))
                assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), (request, reply)
                if reply["ok"]:
                    assert request["op"] == "status", f"{request!r} accepted: {reply!r}"
                    continue
                error = reply.get("error")
                assert isinstance(error, str) and error and "\n" not in error, (request, reply)
                assert reply.get("exit") in (2, 3), f"{request!r}: {reply!r}"
                assert vm.status()["migration"] is None, f"{request!r} started a migration"

    example()
    assert vm.proc.poll() is None and vm.nbdkit_pid() == nbdkit_pid
    assert snapshot(vm, src, dest_dir) == before
    deadline = time.monotonic() + 10
    while counts() != start:
        assert time.monotonic() < deadline, f"(fds, threads) of agent, nbdkit: {counts()} instead of {start}"
        time.sleep(0.05)
