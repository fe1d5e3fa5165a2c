"""A private PostgreSQL 15 cluster for the tests that need what the shared server must not be
reconfigured for: wal_level = logical with wal2json (Realtime), TLS with a certificate of
our own (connections). Started in a temporary directory on a loopback port of its own,
stopped and deleted at the end. Tests skip, saying why, where PostgreSQL 15 is missing.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PG15 = Path("/usr/lib/postgresql/15")
BIN = PG15 / "bin"


@dataclass(frozen=True)
class Cluster:
    port: int
    home: Path

    def url(self, database: str = "postgres", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}" + (f"?{query}" if query else "")

    @property
    def ca(self) -> Path:
        return self.home / "ca.crt"


def missing(wal2json: bool = False) -> str | None:
    """Why this machine cannot start the cluster, or None."""
    if not (BIN / "initdb").exists():
        return "PostgreSQL 15 is not installed (/usr/lib/postgresql/15)"
    if wal2json and not (PG15 / "lib" / "wal2json.so").exists():
        return "wal2json is not installed: run scripts/setup_pg_tools.sh as root (postgresql-15-wal2json)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: initdb refuses to run as root"
    return None


def as_server_user(argv: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the postgres system user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def allow_wal2json() -> str:
    """This machine's PostgreSQL build lists the output plugins a slot may use
    (output_plugin_libraries, not a stock setting); where it exists, add wal2json."""
    described = subprocess.run([str(BIN / "postgres"), "--describe-config"],
                               capture_output=True, text=True, timeout=60).stdout
    for line in described.splitlines():
        name, *rest = line.split("\t")
        if name == "output_plugin_libraries":
            return f" -c output_plugin_libraries={rest[3].replace(' ', '')},wal2json"
    return ""


def write_certificates(home: Path, ca_common_name: str = "rjs test CA") -> str:
    """A CA and a server certificate for 127.0.0.1 signed by it; the options that use them."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_common_name)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    (home / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (home / "server.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (home / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (home / "server.key").chmod(0o600)
    return f" -c ssl=on -c ssl_cert_file={home}/server.crt -c ssl_key_file={home}/server.key"


@contextmanager
def cluster(*, logical: bool = False, tls: bool = False) -> Iterator[Cluster]:
    """Start a private PostgreSQL 15; stop and delete it afterwards."""
    home = Path(tempfile.mkdtemp(prefix="rjs-pg15-"))
    data, port = home / "data", free_port()
    options = (f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={home} "
               "-c fsync=off -c max_connections=40")
    if logical:
        options += " -c wal_level=logical -c max_replication_slots=4 -c max_wal_senders=4" + allow_wal2json()
    if tls:
        options += write_certificates(home)
    ctl = [str(BIN / "pg_ctl"), "-D", str(data), "-w", "-t", "60"]
    try:
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "postgres:postgres", str(home)], check=True, timeout=30)
        subprocess.run(as_server_user([str(BIN / "initdb"), "-D", str(data), "-U", "postgres",
                                       "--auth=trust", "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        started = subprocess.run(as_server_user([*ctl, "-o", options, "-l", str(home / "log"), "start"]),
                                 capture_output=True, text=True, timeout=90)
        if started.returncode != 0:
            log = (home / "log").read_text() if (home / "log").exists() else started.stderr
            raise RuntimeError(f"the private PostgreSQL 15 did not start: {log[-2000:]}")
        yield Cluster(port, home)
    finally:
        subprocess.run(as_server_user([*ctl, "-m", "fast", "stop"]), capture_output=True, timeout=90)
        shutil.rmtree(home, ignore_errors=True)
