"""The agent API on TCP for other hosts: mutual TLS, the ds_* ops only, every path confined to a datastore.

A real agent offering one datastore on 127.0.0.1 (tests/remote/conftest.py `ds_host`), real TLS
clients. What must hold: a client with a certificate of the site CA is served; one without a
certificate, with one of another CA, or speaking plaintext reaches no op and creates nothing;
the VM ops are not there; no path outside the datastore can be created, written, read, renamed
or removed, whether by '..', another absolute path, a directory symlink or a symlink at the last
component; peers make partials only and never replace or remove a finished file.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from remotelib import DatastoreHost, b64, raw_client_context, snapshot

from agent.errors import SvmotionError
from agent.partial import read_identity
from agent.remote import RemoteUnreachable
from nbd_plugin.backend import FileBackend
from nbd_plugin.digest import chunk_digests

SUFFIX = ".svmotion-partial"
IDENTITY = {"vm": "vm1", "disk": "disk0", "source": "/var/lib/vm1/disk0.raw", "size": 1 << 20,
            "migration": "m1", "granularity": 65536}


@pytest.fixture
def work(ds_host: DatastoreHost, request: pytest.FixtureRequest) -> Path:
    """This test's own directory in the shared datastore."""
    d = ds_host.datastore / request.node.name.replace("[", "-").replace("]", "").replace("/", "_")[:100]
    d.mkdir()
    return d


def refused(ds_host: DatastoreHost, op: str, exit_code: int = 3, **args: Any) -> str:
    """Call an op that must be refused; its one-line error."""
    with pytest.raises(SvmotionError) as err:
        ds_host.ds(op, **args)
    text = str(err.value)
    assert err.value.exit_code == exit_code, text
    assert "\n" not in text and f"127.0.0.1:{ds_host.api_port}" in text, text
    return text


# ---- who may talk -------------------------------------------------------------------------------

def test_a_client_with_a_site_certificate_is_served(ds_host: DatastoreHost) -> None:
    hello = ds_host.ds("ds_hello")
    assert [d["name"] for d in hello["datastores"]] == ["ds1"]
    assert hello["datastores"][0]["path"] == str(ds_host.datastore) and hello["datastores"][0]["free_bytes"] > 0
    assert hello["nbd_port"] == ds_host.nbd_port
    assert set(hello["ops"]) == {"ds_check", "ds_create", "ds_digests", "ds_export", "ds_fsync", "ds_hello",
                                 "ds_read_file", "ds_remove", "ds_rename", "ds_stat", "ds_write_file"}
    site = ds_host.pki.site
    good = ds_host.attempt(raw_client_context(site / "ca-cert.pem", ds_host.pki.client), {"op": "ds_hello"})
    assert json.loads(good)["ok"] is True


@pytest.mark.parametrize("who", ["no client certificate", "certificate of another CA", "plaintext"])
def test_clients_without_a_site_certificate_reach_no_op(ds_host: DatastoreHost, work: Path, who: str) -> None:
    site_ca, pki = ds_host.pki.site / "ca-cert.pem", ds_host.pki
    context = {"no client certificate": raw_client_context(site_ca, None),
               "certificate of another CA": raw_client_context(site_ca, pki.other / "a.test"),
               "plaintext": None}[who]
    target = work / f"disk0.raw{SUFFIX}"
    answer = ds_host.attempt(context, {"op": "ds_create", "path": str(target), "size": 4096})
    assert '"ok"' not in answer, answer
    assert not target.exists() and list(work.iterdir()) == []
    # The agent logs the refusal in the connection's thread, maybe after we saw the connection close.
    deadline = time.monotonic() + 10
    while "TLS handshake failed" not in ds_host.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "TLS handshake failed" in ds_host.log_text()
    assert ds_host.ds("ds_hello")["ok"], "the agent goes on serving good clients"


def test_the_client_checks_the_server_and_errors_name_the_host(ds_host: DatastoreHost) -> None:
    # The server's certificate is for 127.0.0.1, not localhost; the other CA does not know the site's.
    for host, host_dir, words in (("localhost", None, ["certificate is not valid for 'localhost'"]),
                                  ("127.0.0.1", ds_host.pki.other / "a.test", ["certificate", "127.0.0.1"])):
        with pytest.raises(RemoteUnreachable) as err:
            ds_host.remote(host_dir, host=host)
        text = str(err.value)
        assert err.value.exit_code == 4 and "\n" not in text, text
        assert f"{host}:{ds_host.api_port}" in text
        for word in words:
            assert word in text, text


@pytest.mark.parametrize("op", ["migrate", "status", "abort", "verify", "shutdown", "hello", "ds_nope"])
def test_only_datastore_ops_are_served(ds_host: DatastoreHost, op: str) -> None:
    text = refused(ds_host, op, exit_code=2, vm="vm1")
    assert f"unknown op '{op}'" in text and "ds_create" in text
    assert ds_host.ds("ds_hello")["ok"]


# ---- what a migration does there ------------------------------------------------------------------

def test_a_disk_and_a_file_through_their_life(ds_host: DatastoreHost, work: Path) -> None:
    check = ds_host.ds("ds_check", dir=str(work), names=["vm1.nvram"], resumable=["disk0.raw"], need_bytes=1 << 20)
    assert check["partials"] == {} and check["free_bytes"] >= 1 << 20
    partial = work / f"disk0.raw{SUFFIX}"
    created = ds_host.ds("ds_create", path=str(partial), size=1 << 20, identity=IDENTITY, mode=0o640)
    assert partial.stat().st_size == 1 << 20 and partial.stat().st_blocks == 0, "sparse"
    assert read_identity(str(partial)).migration == "m1"
    export = created["export"]
    assert os.readlink(ds_host.state / "exports" / export) == str(partial)

    # DiskLoad's view of it, and resuming it under a new migration id.
    again = ds_host.ds("ds_check", dir=str(work), names=[], resumable=["disk0.raw"])
    assert again["partials"]["disk0.raw"] == {"regular": True, "size": 1 << 20, "identity": {**IDENTITY}}
    resumed = ds_host.ds("ds_create", path=str(partial), size=1 << 20, identity={**IDENTITY, "migration": "m2"},
                         resume=True)
    assert resumed["export"] == export and read_identity(str(partial)).migration == "m2"
    refused(ds_host, "ds_create", path=str(partial), size=1 << 20)          # exists: not made twice

    with open(partial, "r+b") as f:         # what the NBD export would have written
        f.seek(65536)
        f.write(os.urandom(100_000))
    digests = ds_host.ds("ds_digests", path=str(partial), granularity=65536)
    backend = FileBackend(str(partial), readonly=True)
    try:
        assert bytes.fromhex(digests["digests"]) == chunk_digests(backend, 0, 1 << 20, 65536)
    finally:
        backend.close()
    part = ds_host.ds("ds_digests", path=str(partial), offset=131072, count=65536, granularity=4096)
    assert len(bytes.fromhex(part["digests"])) == 16 * 16

    # A file in two pieces, in order; its digest as the file mirror records it.
    nvram = work / f"vm1.nvram{SUFFIX}"
    data = os.urandom(700_000)
    assert ds_host.ds("ds_write_file", path=str(nvram), data=b64(data[:400_000]))["bytes"] == 400_000
    refused(ds_host, "ds_write_file", path=str(nvram), data=b64(b"x"), offset=5)
    last = ds_host.ds("ds_write_file", path=str(nvram), data=b64(data[400_000:]), offset=400_000, sha256=True)
    assert last == {"ok": True, "bytes": 700_000, "sha256": hashlib.sha256(data).hexdigest()}
    assert nvram.read_bytes() == data
    again = ds_host.ds("ds_write_file", path=str(nvram), data=b64(b"short"), sha256=True)   # offset 0: rewrite
    assert nvram.read_bytes() == b"short" and again["sha256"] == hashlib.sha256(b"short").hexdigest()
    refused(ds_host, "ds_write_file", exit_code=2, path=str(nvram), data=b64(bytes(600 << 10)))
    refused(ds_host, "ds_write_file", exit_code=2, path=str(nvram), data="not base64!")

    for path in (partial, nvram, work):
        ds_host.ds("ds_fsync", path=str(path))

    # DiskCopyDone: final names; the export keeps its name and now points at the final file.
    renamed = ds_host.ds("ds_rename", path=str(partial))
    final = work / "disk0.raw"
    assert renamed == {"ok": True, "path": str(final), "export": export}
    assert final.stat().st_size == 1 << 20 and not partial.exists() and not Path(f"{partial}.json").exists()
    assert os.readlink(ds_host.state / "exports" / export) == str(final)
    assert ds_host.ds("ds_rename", path=str(partial))["path"] == str(final), "done already is fine"
    ds_host.ds("ds_rename", path=str(nvram))
    assert (work / "vm1.nvram").read_bytes() == b"short"
    refused(ds_host, "ds_check", dir=str(work), names=["disk0.raw"])

    # Cleanup removes partials and their records, never a final file.
    other = work / f"disk1.raw{SUFFIX}"
    ds_host.ds("ds_create", path=str(other), size=4096, identity={**IDENTITY, "disk": "disk1", "size": 4096})
    removed = ds_host.ds("ds_remove", path=str(other))
    assert sorted(removed["removed"]) == [other.name, f"{other.name}.json"] and removed["unexported"]
    assert not other.exists() and not Path(f"{other}.json").exists()
    assert ds_host.ds("ds_remove", path=str(other))["removed"] == [], "missing is fine"
    refused(ds_host, "ds_remove", path=str(final))
    assert final.exists()
    assert "ds_remove from a.test (127.0.0.1:" in ds_host.log_text(), "changes are logged with the peer's name"


def test_a_rename_never_replaces_a_finished_file(ds_host: DatastoreHost, work: Path) -> None:
    partial = work / f"disk0.raw{SUFFIX}"
    ds_host.ds("ds_create", path=str(partial), size=4096)
    (work / "disk0.raw").write_bytes(b"keep me")
    text = refused(ds_host, "ds_rename", path=str(partial))
    assert "already exists" in text
    assert (work / "disk0.raw").read_bytes() == b"keep me" and partial.exists()
    assert "not a partial name" in refused(ds_host, "ds_create", path=str(work / f"disk0.raw{SUFFIX}x"), size=1)
    assert "not a partial name" in refused(ds_host, "ds_write_file", path=str(work / "disk0.raw"), data=b64(b"x"))
    assert "identity record" in refused(ds_host, "ds_remove", path=f"{partial}.json")
    (work / "disk1.raw").write_bytes(b"keep me too")
    assert "final name" in refused(ds_host, "ds_create", path=str(work / f"disk1.raw{SUFFIX}"), size=1)
    assert (work / "disk1.raw").read_bytes() == b"keep me too"


def test_ds_check_refuses_names_in_the_way_and_too_little_space(ds_host: DatastoreHost, work: Path) -> None:
    (work / "vm1.nvram").write_bytes(b"x")
    (work / f"disk1.raw{SUFFIX}").write_bytes(b"x")
    assert "vm1.nvram" in refused(ds_host, "ds_check", dir=str(work), names=["vm1.nvram"])
    assert "disk1.raw" in refused(ds_host, "ds_check", dir=str(work), names=["disk1.raw"])
    assert "free" in refused(ds_host, "ds_check", dir=str(work), names=["a"], need_bytes=1 << 61)
    assert "does not exist" in refused(ds_host, "ds_check", dir=str(work / "nope"), names=["a"])
    assert "not a file name" in refused(ds_host, "ds_check", exit_code=2, dir=str(work), names=["../a"])
    assert ds_host.ds("ds_check", dir=str(ds_host.datastore), names=["fresh"])["ok"], "the root is a directory too"


# ---- confinement ------------------------------------------------------------------------------------

@pytest.fixture
def trap(ds_host: DatastoreHost, work: Path) -> Callable[[], dict[str, Any]]:
    """A directory outside the datastore with a precious file, symlinks to it from inside, and a
    sibling whose name starts with the datastore's. Returns a snapshot of everything outside."""
    outside = ds_host.root / f"outside-{work.name}"
    outside.mkdir()
    (outside / "target").write_bytes(b"precious")
    (outside / f"x{SUFFIX}").write_bytes(b"precious partial")
    twin = Path(f"{ds_host.datastore}x")
    twin.mkdir(exist_ok=True)
    (work / "escape").symlink_to(outside)
    (work / f"link{SUFFIX}").symlink_to(outside / "target")
    (work / f"dirlink{SUFFIX}").symlink_to(outside)
    return lambda: {"outside": snapshot(outside), "twin": snapshot(twin), "work": snapshot(work)}


ATTACKS = {
    "dotdot": lambda ds, work: f"{work}/../../outside-{work.name}/x{SUFFIX}",
    "elsewhere": lambda ds, work: f"{ds.root}/outside-{work.name}/x{SUFFIX}",
    "twin prefix": lambda ds, work: f"{ds.datastore}x/x{SUFFIX}",
    "symlinked directory": lambda ds, work: f"{work}/escape/x{SUFFIX}",
    "symlink at the end": lambda ds, work: f"{work}/link{SUFFIX}",
    "symlink to a directory": lambda ds, work: f"{work}/dirlink{SUFFIX}",
    "relative": lambda ds, work: f"x{SUFFIX}",
    "the datastore itself": lambda ds, work: f"{ds.datastore}/",
}
OPS = {
    "ds_create": {"size": 4096},
    "ds_write_file": {"data": b64(b"evil")},
    "ds_rename": {},
    "ds_remove": {},
    "ds_digests": {},
    "ds_fsync": {},
    "ds_export": {},
    "ds_read_file": {},
}


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("op", OPS)
def test_no_op_reaches_outside_a_datastore(ds_host: DatastoreHost, work: Path, trap, op: str, attack: str) -> None:
    if op == "ds_fsync" and attack == "the datastore itself":
        pytest.skip("fsync of the datastore's own directory is allowed (and harmless)")
    before = trap()
    path = ATTACKS[attack](ds_host, work)
    text = refused(ds_host, op, exit_code=2 if attack == "relative" else 3, path=path, **OPS[op])
    assert repr(path) in text or path in text, text
    assert trap() == before
    assert not any(p.name.startswith("ds1-") and os.readlink(p).startswith(str(ds_host.root / "outside"))
                   for p in (ds_host.state / "exports").iterdir())


@pytest.mark.parametrize("op", ["ds_check", "ds_stat"])
@pytest.mark.parametrize("attack", ["dotdot", "elsewhere", "twin prefix", "symlinked directory", "relative"])
def test_ops_on_a_directory_stay_inside_too(ds_host: DatastoreHost, work: Path, trap, attack: str, op: str) -> None:
    directory = os.path.dirname(ATTACKS[attack](ds_host, work)) or "."
    before = trap()
    refused(ds_host, op, exit_code=2 if attack == "relative" else 3, dir=directory, names=["target"])
    assert trap() == before
