"""
The page's files, read once from the package's ``static/`` folder.

Only the files named in :data:`ASSETS` are served, each under its own name:
nothing is looked up on disk per request, so no path can reach outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Mapping

#: name -> content type of every file the page is made of.
ASSETS: Mapping[str, bytes] = {
    "index.html": b"text/html; charset=utf-8",
    "admin.js": b"text/javascript; charset=utf-8",
    "admin.css": b"text/css; charset=utf-8",
    "favicon.svg": b"image/svg+xml",
}


@dataclass(frozen=True)
class Asset:
    """One file of the page."""

    body: bytes
    content_type: bytes


def load_assets() -> dict[str, Asset]:
    """Every asset, read from the installed package."""
    folder = resources.files(__package__).joinpath("static")
    return {
        name: Asset(folder.joinpath(name).read_bytes(), content_type)
        for name, content_type in ASSETS.items()
    }
