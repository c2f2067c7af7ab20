"""
Trusted CA certificates for TLS to the upstream and to Redis: SSL_CERT_FILE.

Its own module so that the settings (:mod:`twisted_forward.config`, which
checks the file at start-up) and the connections that use it
(:mod:`twisted_forward.outbound`, :mod:`twisted_forward.redis_link`) can
all import it without importing each other.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from OpenSSL.crypto import Error as OpenSSLError
from twisted.internet.ssl import Certificate, trustRootFromCertificates

if TYPE_CHECKING:
    from ._compat import IOpenSSLTrustRoot

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def read_ca_file(path: str) -> list[Certificate]:
    """The certificates of a PEM bundle (SSL_CERT_FILE), read by OpenSSL.

    OpenSSL reads them as it reads its own CA files, so system bundles
    with certificates stricter parsers reject load the same way.

    :raises ValueError: if the file cannot be read or holds no certificate.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path!r} ({e.strerror})") from None
    certificates = []
    for block in _PEM_CERTIFICATE.findall(data):
        try:
            certificates.append(Certificate.loadPEM(block))
        except OpenSSLError:
            raise ValueError(f"{path!r} holds a certificate OpenSSL cannot read") from None
    if not certificates:
        raise ValueError(f"{path!r} holds no PEM certificate")
    return certificates


def load_trust_root(path: str) -> "IOpenSSLTrustRoot":
    """The CA certificates in a PEM file, as a trust root for TLS policies."""
    return trustRootFromCertificates(read_ca_file(path))
