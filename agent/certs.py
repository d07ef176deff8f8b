"""`svmotion tls init`: a site CA and, per host, a key and a certificate it signed (X.509, mutual TLS).

Design notes
- One CA for a lab or a site; each host gets one key and one certificate that is both a TLS
  server and a TLS client certificate (extended key usage serverAuth + clientAuth), since an
  agent is the server of its datastores and the client of the others'. Subject alternative
  names are what clients check: a DNS name, or an IP address where the host is given as one.
- Layout, the one nbdkit reads with --tls-certificates=DIR (man nbdkit-tls) and libnbd with
  set_tls_certificates(DIR), so a host directory is usable as it is by nbdkit, libnbd and the
  agent (`[tls] dir = ".../HOST"`):
      DIR/ca-cert.pem  DIR/ca-key.pem                       the CA (the key never leaves DIR)
      DIR/HOST/ca-cert.pem                                  a copy of the CA certificate
      DIR/HOST/server-cert.pem DIR/HOST/server-key.pem      the host's certificate and key
      DIR/HOST/client-cert.pem DIR/HOST/client-key.pem      the same certificate and key again
  Copies rather than symlinks, so that `scp -r` or any deployment tool carries a working directory.
- Keys are ECDSA P-256: accepted by GnuTLS (nbdkit, libnbd) and OpenSSL (Python's ssl), and
  cheap to handshake with, which matters where a reopen of a remote disk is a TLS handshake.
- Crypto is the `cryptography` package's (Debian's python3-cryptography); nothing here is
  hand-made. Keys are written mode 0600, certificates 0644, directories 0700.
- Nothing is overwritten without `force`: every target is checked before anything is written,
  so a refusal changes nothing. An existing CA (both files) is reused to sign new hosts; a new CA
  needs its old files removed (every host certificate signed by the old one stops working).
"""
from __future__ import annotations

import datetime
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import Refused
from agent.remote import Name, parse_name

CA_CERT, CA_KEY = "ca-cert.pem", "ca-key.pem"
HOST_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")
DEFAULT_DAYS = 3650
MAX_DAYS = 36500
CLOCK_SKEW = datetime.timedelta(minutes=5)     # certificates are valid from a little before now


@dataclass(frozen=True)
class Host:
    """One host to certify: its directory name and the names clients may reach it by.

    Example: `parse_host("hostb,192.0.2.2")` -> Host("hostb", ("hostb", IPv4Address("192.0.2.2")))
    """

    dir_name: str
    names: tuple[Name, ...]


def parse_host(text: str) -> Host:
    """`NAME[,NAME...]`: the first names the host's directory, all go into the certificate."""
    names = tuple(parse_name(part) for part in text.split(","))
    return Host(dir_name=str(names[0]), names=names)


def plan_files(out: Path, hosts: list[Host], force: bool) -> tuple[bool, list[Path]]:
    """(whether the CA is to be made, the files to write); Refused naming the first one in the way."""
    ca = [out / CA_CERT, out / CA_KEY]
    have_ca = [p.exists() for p in ca]
    if any(have_ca) and not all(have_ca):
        present = ca[have_ca.index(True)]
        raise Refused(f"{present} exists without its pair ({ca[have_ca.index(False)].name}); restore it, or "
                      f"remove {present} to make a new CA")
    targets = [out / h.dir_name / name for h in hosts for name in HOST_FILES]
    if not force:
        for path in targets:
            if path.exists() or path.is_symlink():
                raise Refused(f"{path} already exists; pass --force to overwrite the host's files "
                              f"(the CA in {out} is kept)")
    return not all(have_ca), targets


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(days: int, now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign host certificates only (path length 0)."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "svmotion"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"svmotion CA {secrets.token_hex(4)}")])
    public = key.public_key()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_host_cert(host: Host, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, days: int,
                   now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The host's key and its server+client certificate; it never outlives the CA."""
    key = new_key()
    sans = [x509.DNSName(n) if isinstance(n, str) else x509.IPAddress(n) for n in host.names]
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after)
    public = key.public_key()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "svmotion"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, host.dir_name)]))
            .issuer_name(ca_cert.subject).public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` atomically with `data` at `mode` (a key is never readable by others, even briefly)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def init(out: Path, hosts: list[Host], days: int = DEFAULT_DAYS, force: bool = False) -> list[str]:
    """Write the CA (unless one is there) and each host's files; return what was done, one line each.

    Example: `init(Path("/etc/svmotion/tls"), [parse_host("hosta"), parse_host("hostb,192.0.2.2")])`
    """
    names = [h.dir_name for h in hosts]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise Refused(f"host {twice!r} is given twice; name each host once")
    new_ca, _ = plan_files(out, hosts, force)
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    done = []
    if new_ca:
        ca_key, ca_cert = make_ca(days, now)
        write_file(out / CA_KEY, key_pem(ca_key), 0o600)
        write_file(out / CA_CERT, cert_pem(ca_cert), 0o644)
        done.append(f"CA: {out / CA_CERT} (key {out / CA_KEY}: keep it off the hosts)")
    else:
        ca_cert = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise Refused(f"{out / CA_KEY} is not an ECDSA key made by `svmotion tls init`; use another DIR")
        done.append(f"CA: reusing {out / CA_CERT}")
    ca_bytes = cert_pem(ca_cert)
    for host in hosts:
        key, cert = make_host_cert(host, ca_key, ca_cert, days, now)
        host_dir = out / host.dir_name
        host_dir.mkdir(mode=0o700, exist_ok=True)
        write_file(host_dir / "ca-cert.pem", ca_bytes, 0o644)
        for role in ("server", "client"):
            write_file(host_dir / f"{role}-cert.pem", cert_pem(cert), 0o644)
            write_file(host_dir / f"{role}-key.pem", key_pem(key), 0o600)
        shown = ", ".join(str(n) for n in host.names)
        done.append(f"host {host.dir_name}: {host_dir}/ (names {shown}; valid until "
                    f"{cert.not_valid_after:%Y-%m-%d})")
    return done
