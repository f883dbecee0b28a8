"""Certificates for the test bed's control plane, made with openssl."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


class PKI:
    """A CA and the certificates signed by it, under `root` (made once, then reused)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca = KeyPair(root / "ca.crt", root / "ca.key")
        if not self.ca.cert.exists():
            _openssl(
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "30",
                "-subj",
                "/CN=jobtide-testbed-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                cwd=root,
            )

    def issue(
        self,
        name: str,
        *,
        common_name: str,
        organization: str | None = None,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        server: bool = False,
    ) -> KeyPair:
        pair = KeyPair(self.root / f"{name}.crt", self.root / f"{name}.key")
        if pair.cert.exists():
            return pair
        subject = f"/CN={common_name}" + (f"/O={organization}" if organization else "")
        usage = "serverAuth" if server else "clientAuth"
        ext = [
            "basicConstraints=CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={usage}",
        ]
        alt = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
        if alt:
            ext.append("subjectAltName=" + ",".join(alt))
        (self.root / f"{name}.ext").write_text("\n".join(ext) + "\n")
        _openssl(
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            pair.key.name,
            "-out",
            f"{name}.csr",
            cwd=self.root,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            f"{name}.ext",
            "-out",
            pair.cert.name,
            cwd=self.root,
        )
        return pair

    def service_account_keys(self) -> KeyPair:
        """The key that signs ServiceAccount tokens (`cert` holds the public key)."""
        pair = KeyPair(self.root / "sa.pub", self.root / "sa.key")
        if not pair.key.exists():
            _openssl("genrsa", "-out", "sa.key", "2048", cwd=self.root)
            _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=self.root)
        return pair
