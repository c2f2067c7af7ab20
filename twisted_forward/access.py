"""
The IP gate: a wrapper resource that refuses clients by address.

(Minimal first version: TCP peer only; the trusted-proxy walk comes next.)
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from .config import IPNetwork
from .errors import write_error


class AccessGate(Resource):
    """Renders the wrapped resource for allowed clients, 403 for others."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        wrapped: IResource,
        allow: Sequence[IPNetwork],
        deny: Sequence[IPNetwork],
        trusted: Sequence[IPNetwork],
    ) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        self.trusted = tuple(trusted)

    def render(self, request: IRequest) -> bytes | int:
        peer = getattr(request.getClientAddress(), "host", None)
        try:
            address = ipaddress.ip_address(peer) if peer else None
        except ValueError:
            address = None
        request.forward_client = str(address) if address is not None else "unix"
        if address is not None:
            if (self.allow and not any(address in n for n in self.allow)) or any(
                address in n for n in self.deny
            ):
                return write_error(
                    request, 403, "ip_not_allowed", "Your address may not use this proxy."
                )
        return self.wrapped.render(request)
