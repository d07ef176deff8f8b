"""A datastore agent on host b, its clients on host a: the two-host set-up of issue 11, end to end.

Hosts are network namespaces joined by a veth (svlab/netns.py, `two_hosts`); the agent runs
inside b (`lab_ds_host`) with b's certificate and listens on b's address only; the tests'
clients connect from a with a's certificate: the agent API in this process (`Host.entered`),
the NBD export with nbdcopy and nbdinfo run inside a. What tests/remote/test_datastore_api.py
and test_datastore_export.py check on loopback is not repeated here; this shows it holds across
two hosts: mutual TLS between them, the refusals, and data over NBD with TLS over the link.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from remotelib import DatastoreHost, raw_client_context

from svlab.netns import Lab
from agent.remote import RemoteUnreachable, nbd_uri

SUFFIX = ".svmotion-partial"
MiB = 1 << 20


def test_the_agent_runs_on_b_and_a_talks_to_it_over_mutual_tls(lab_ds_host: DatastoreHost,
                                                                two_hosts: Lab) -> None:
    export_pid = lab_ds_host.export_pid()[0]
    assert two_hosts.pids_inside() == {"b": sorted([lab_ds_host.proc.pid, export_pid])}, \
        "the agent and its nbdkit run on b, nothing on a"
    with lab_ds_host.remote() as b:
        assert b.where == f"198.18.0.2:{lab_ds_host.api_port}"
        hello = b.call("ds_hello")
    assert [d["name"] for d in hello["datastores"]] == ["ds1"] and hello["nbd_port"] == lab_ds_host.nbd_port
    lab_ds_host.ds("ds_create", path=str(lab_ds_host.datastore / f"disk0.raw{SUFFIX}"), size=MiB)
    assert "ds_create from 198.18.0.1 (198.18.0.1:" in lab_ds_host.log_text(), "a's certificate and address"

    lab_ds_host.kill_agent()                  # by PID, as on one host; its nbdkit keeps serving
    assert two_hosts.pids_inside() == {"b": [export_pid]}
    lab_ds_host.start()
    assert lab_ds_host.ds("ds_hello")["ok"] and "adopted running nbdkit" in lab_ds_host.log_text()


def test_clients_without_a_site_certificate_reach_nothing_on_b(lab_ds_host: DatastoreHost, testlib) -> None:
    pki = lab_ds_host.pki
    site_ca = pki.site / "ca-cert.pem"
    target = lab_ds_host.datastore / f"disk0.raw{SUFFIX}"
    for who, context in (("no client certificate", raw_client_context(site_ca, None)),
                         ("certificate of another CA", raw_client_context(site_ca, pki.other / "198.18.0.1")),
                         ("plaintext", None)):
        answer = lab_ds_host.attempt(context, {"op": "ds_create", "path": str(target), "size": 4096})
        assert '"ok"' not in answer, (who, answer)
    assert list(lab_ds_host.datastore.iterdir()) == [] and list((lab_ds_host.state / "exports").iterdir()) == []
    def refusals() -> list[str]:        # b logs each in its own thread, maybe after a has seen the end
        return [line for line in lab_ds_host.log_text().splitlines() if "TLS handshake failed" in line]
    testlib.wait_until(lambda: len(refusals()) == 3, 10, "b to log three refusals", log=lab_ds_host.log)
    assert all("refused 198.18.0.1:" in line for line in refusals()), refusals()

    # An agent on a holding another CA's certificate: one line naming b, exit 4 (agent unreachable).
    with pytest.raises(RemoteUnreachable) as err:
        lab_ds_host.remote(pki.other / "198.18.0.1").call("ds_hello")
    text = str(err.value)
    assert "\n" not in text and err.value.exit_code == 4, text
    assert f"198.18.0.2:{lab_ds_host.api_port}" in text and "certificate" in text, text
    assert lab_ds_host.ds("ds_hello")["ok"], "b goes on serving a"


def test_an_nbd_client_on_a_writes_and_reads_an_export_of_b_over_tls(lab_ds_host: DatastoreHost,
                                                                     two_hosts: Lab, tmp_path: Path) -> None:
    a = two_hosts["a"]
    partial = lab_ds_host.datastore / f"disk0.raw{SUFFIX}"
    export = lab_ds_host.ds("ds_create", path=str(partial), size=4 * MiB)["export"]
    uri = nbd_uri(lab_ds_host.address, lab_ds_host.nbd_port, export)
    with_certs = f"{uri}?tls-certificates={lab_ds_host.client_dir}"
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(4 * MiB))

    def on_a(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(a.argv(list(argv)), capture_output=True, timeout=60)

    wrote = on_a("nbdcopy", "--flush", str(source), with_certs)
    assert wrote.returncode == 0, wrote.stderr
    assert partial.read_bytes() == source.read_bytes()
    read = on_a("nbdcopy", with_certs, "-")
    assert read.returncode == 0 and read.stdout == source.read_bytes(), read.stderr

    only_ca = tmp_path / "only-ca"                       # trusts b, has no certificate to show it
    only_ca.mkdir()
    (only_ca / "ca-cert.pem").write_bytes((lab_ds_host.pki.site / "ca-cert.pem").read_bytes())
    for client, why in ((uri.replace("nbds://", "nbd://"), "plaintext"),
                        (f"{uri}?tls-certificates={only_ca}", "no client certificate")):
        refused = on_a("nbdinfo", client)
        assert refused.returncode != 0, why
