"""TLS: the contexts a node serves and calls with, and the local CA ``raftledger up --tls`` makes.

A node with ``[tls] cert_file`` serves its public API over HTTPS (asking clients for a certificate
signed by ``client_ca_file`` when that is set). With ``ca_file`` (the cluster CA) its internal
listener speaks TLS too, and every call it makes to another node (the internal protocol, proxied
reads and feeds, joining) verifies that node against the CA and presents this node's certificate.
The Raft ports keep their own AES-GCM sealing (``node.frames``) and are not wrapped.

``LocalCA`` is for clusters on one machine: a self-signed CA (ECDSA P-256, ``cryptography``) and one
certificate per node naming its hosts (``localhost``, ``127.0.0.1``, ``::1`` and the node id). Keys
are written mode 0600, as the cluster secret is.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

from .config import ConfigError
from .settings import TlsSettings

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
cert_validity_days = 825
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def server_context(settings: TlsSettings, *, internal: bool) -> ssl.SSLContext | None:
    """The context of the public listener (``internal=False``) or of the internal one; None: plain.
    Raises ConfigError when a file cannot be read or is not what it should be."""
    if not settings.cert_file or (internal and not settings.ca_file):
        return None
    with _readable(settings):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(settings.cert_file, settings.key_file)
        if not internal and settings.client_ca_file:
            context.load_verify_locations(settings.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """What a node calls other nodes with: the system's CAs and the cluster's, and this node's own
    certificate for listeners that ask for one (None: the defaults, no cluster CA)."""
    if not settings.ca_file:
        return None
    with _readable(settings):
        context = ssl.create_default_context()
        context.load_verify_locations(settings.ca_file)
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


@contextlib.contextmanager
def _readable(settings: TlsSettings) -> Iterator[None]:
    try:
        yield
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[tls]: cannot use cert_file {settings.cert_file!r}, key_file "
                          f"{settings.key_file!r}, ca_file {settings.ca_file!r} or client_ca_file "
                          f"{settings.client_ca_file!r}: {exc}") from None


def internal_scheme(settings: TlsSettings) -> str:
    return "https" if settings.ca_file and settings.cert_file else "http"


def write_private(path: str, data: bytes) -> None:
    """Write a key readable by its owner only (mode 0600 from its creation)."""
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class LocalCA:
    """A CA in ``directory`` (``ca.pem``, ``ca.key``) that issues node certificates beside it."""

    directory: str

    @property
    def cert_file(self) -> str:
        return os.path.join(self.directory, CA_CERT)

    def node_files(self, node_id: str) -> tuple[str, str]:
        return os.path.join(self.directory, f"{node_id}.pem"), os.path.join(self.directory, f"{node_id}.key")

    def ensure(self) -> None:
        """Create the CA once; an existing one is kept (its nodes' certificates stay valid)."""
        if os.path.exists(self.cert_file) and os.path.exists(os.path.join(self.directory, CA_KEY)):
            return
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "raftledger local CA")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=cert_validity_days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                               critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        write_private(os.path.join(self.directory, CA_KEY), key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        with open(self.cert_file, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, hosts: tuple[str, ...] = LOCAL_HOSTS) -> tuple[str, str]:
        """A certificate for ``name`` (a node, or a client) valid for ``hosts``, made once; its
        (cert, key) paths."""
        cert_path, key_path = self.node_files(name)
        if os.path.exists(cert_path) and os.path.exists(key_path):
            return cert_path, key_path
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        self.ensure()
        with open(os.path.join(self.directory, CA_KEY), "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), None)
        with open(self.cert_file, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=cert_validity_days))
                .add_extension(x509.SubjectAlternativeName(_names(name, hosts)), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH,
                                                      x509.ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
                .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
        write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path


def _names(name: str, hosts: tuple[str, ...]) -> list:  # type: ignore[type-arg]
    from cryptography import x509

    out: list = []  # type: ignore[type-arg]
    for host in dict.fromkeys((*hosts, name)):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out
