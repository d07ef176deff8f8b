"""`svmotion tls init`: what it writes is checked by openssl, the way nbdkit and libnbd will read it.

The real CLI in a subprocess; openssl (Debian's /usr/bin/openssl) verifies the chains, the
purposes (a host is TLS server and client), the names and that each key belongs to its
certificate. Refusals (files in the way, a bad host name) change nothing.
"""
from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from remotelib import snapshot, svmotion

HOST_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


def verify(ca: Path, cert: Path, purpose: str) -> bool:
    done = openssl("verify", "-CAfile", str(ca), "-purpose", purpose, str(cert))
    return done.returncode == 0 and done.stdout.strip().endswith(": OK")


def public_key(*args: str) -> str:
    done = openssl(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_tls_init_writes_a_ca_and_host_certificates_that_openssl_verifies(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    done = svmotion("tls", "init", str(out), "--host", "hosta", "--host", "hostb,192.0.2.2,[2001:db8::2]",
                    "--days", "30")
    assert done.returncode == 0, done.stderr
    assert "keep it off the hosts" in done.stdout and "hostb" in done.stdout
    ca = out / "ca-cert.pem"
    assert mode(out / "ca-key.pem") == 0o600 and mode(ca) == 0o644 and mode(out) == 0o700
    for host in ("hosta", "hostb"):
        d = out / host
        assert sorted(p.name for p in d.iterdir()) == sorted(HOST_FILES)
        assert mode(d) == 0o700 and mode(d / "server-key.pem") == 0o600 and mode(d / "client-key.pem") == 0o600
        assert (d / "ca-cert.pem").read_bytes() == ca.read_bytes()
        for role, purpose in (("server", "sslserver"), ("client", "sslclient")):
            cert, key = d / f"{role}-cert.pem", d / f"{role}-key.pem"
            assert verify(ca, cert, purpose), f"{cert} does not verify as {purpose}"
            assert public_key("x509", "-in", str(cert), "-noout", "-pubkey") == \
                public_key("pkey", "-in", str(key), "-pubout")
    sans = openssl("x509", "-in", str(out / "hostb" / "server-cert.pem"), "-noout", "-ext", "subjectAltName").stdout
    assert "DNS:hostb" in sans and "IP Address:192.0.2.2" in sans and "IP Address:2001:DB8:0:0:0:0:0:2" in sans
    dates = openssl("x509", "-in", str(out / "hosta" / "server-cert.pem"), "-noout", "-checkend",
                    str(29 * 86400))
    assert dates.returncode == 0, "valid for the --days asked"
    assert openssl("x509", "-in", str(out / "hosta" / "server-cert.pem"), "-noout", "-checkend",
                   str(31 * 86400)).returncode == 1
    # The CA may sign hosts, the hosts may not sign anything.
    assert "CA:TRUE, pathlen:0" in openssl("x509", "-in", str(ca), "-noout", "-ext", "basicConstraints").stdout
    assert not verify(out / "hosta" / "server-cert.pem", out / "hostb" / "server-cert.pem", "sslserver")


def test_another_ca_is_not_trusted(pki) -> None:
    assert verify(pki.site / "ca-cert.pem", pki.client / "client-cert.pem", "sslclient")
    assert not verify(pki.site / "ca-cert.pem", pki.other / "a.test" / "client-cert.pem", "sslclient")


def test_existing_files_are_refused_without_force_and_nothing_changes(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    assert svmotion("tls", "init", str(out), "--host", "hosta").returncode == 0
    before = snapshot(out)
    done = svmotion("tls", "init", str(out), "--host", "hostb", "--host", "hosta")
    assert done.returncode == 3, done
    assert done.stderr.count("\n") == 1 and str(out / "hosta") in done.stderr and "--force" in done.stderr
    assert snapshot(out) == before, "a refusal writes nothing, not even the hosts that were free"

    # A later host is signed by the same CA; --force rewrites a host's files, never the CA.
    assert svmotion("tls", "init", str(out), "--host", "hostb").returncode == 0
    forced = svmotion("tls", "init", str(out), "--host", "hosta", "--force")
    assert forced.returncode == 0, forced.stderr
    after = snapshot(out)
    assert after["ca-cert.pem"] == before["ca-cert.pem"] and after["ca-key.pem"] == before["ca-key.pem"]
    assert after["hosta/server-cert.pem"] != before["hosta/server-cert.pem"]
    for host in ("hosta", "hostb"):
        assert verify(out / "ca-cert.pem", out / host / "server-cert.pem", "sslserver")


@pytest.mark.parametrize("args, words", [
    (["--host", "bad_name"], ["'bad_name'", "neither a host name"]),
    (["--host", "-x.test"], ["'-x.test'"]),
    (["--host", "a.test", "--days", "0"], ["--days"]),
    ([], ["--host"]),
])
def test_bad_arguments_are_usage_errors_that_write_nothing(tmp_path: Path, args: list[str], words: list[str]) -> None:
    out = tmp_path / "pki"
    done = svmotion("tls", "init", str(out), *args)
    assert done.returncode == 2, done
    for word in words:
        assert word in done.stderr, done.stderr
    assert not out.exists()


def test_a_half_ca_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    assert svmotion("tls", "init", str(out), "--host", "hosta").returncode == 0
    (out / "ca-key.pem").unlink()
    done = svmotion("tls", "init", str(out), "--host", "hostb")
    assert done.returncode == 3 and "without its pair" in done.stderr, done
    assert not (out / "hostb").exists()
