"""TLS certificates made for a test with the ``openssl`` command: a CA and one certificate it signed."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_EXTENSIONS = """\
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=IP:127.0.0.1
"""

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Certificates:
    """PEM files: the CA, and a certificate and key it signed (for the scheduler, workers and client)."""

    ca: Path
    cert: Path
    key: Path

    def flags(self) -> list[str]:
        """The ``--tls-ca-file``/``--tls-cert``/``--tls-key`` options of dask's CLI and dask-infer's."""
        return ["--tls-ca-file", str(self.ca), "--tls-cert", str(self.cert), "--tls-key", str(self.key)]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_certificates(folder: Path) -> Certificates:
    """A fresh CA and a certificate for 127.0.0.1 it signed, in ``folder``; skips without ``openssl``."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make TLS certificates")
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    cert, key, request = folder / "node.pem", folder / "node.key", folder / "node.csr"
    (folder / "ext.cnf").write_text(_EXTENSIONS)
    _openssl("req", "-x509", *_EC, "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", "/CN=ca")
    _openssl("req", *_EC, "-keyout", str(key), "-out", str(request), "-subj", "/CN=127.0.0.1")
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(folder / "ext.cnf"),
    )  # fmt: skip
    return Certificates(ca, cert, key)
