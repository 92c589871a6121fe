"""What a dashboard visitor may read (SPEC §9: safe by default).

* **Local** (the default: ``dora-dashboard`` listens on 127.0.0.1 unless ``--host`` says): the
  visitor is the person at this machine; a typed reference means what it means to
  ``dora-analyze`` (any path, any Hub id).
* **Confined**: when a data root is named (``DORA_DASHBOARD_ROOT=/data`` or
  ``dora-dashboard --root /data``), every typed path is read relative to
  it and must stay inside it once ``..`` and symbolic links are resolved — also every link inside
  a folder that is read; a path outside is refused with the same message as a missing one (a
  visitor learns nothing about the rest of the disk). Hub ids are refused there unless the owner
  allows them (``DORA_DASHBOARD_HUB=1`` or ``--allow-hub``): they would make the server download
  anything, with the owner's token.
* **Served without a root** (bound to another address, e.g. ``--host 0.0.0.0``): no
  typed path is read at all until a root is named; the demo data and uploads still work.

Checked once, before reading: someone who can change the data root's own files meanwhile (a link
swapped between the check and the read) is trusted, as the owner of the root.

:meth:`Access.resolve` is the only way from a string a visitor typed (or a ``ref`` read from a
loaded table) to a :class:`Readable`, and the app's readers (:mod:`~dora_analysis.app.cache`,
:mod:`~dora_analysis.app.follow`) take nothing else: a page cannot hand the library an unchecked
path (``tests/app/test_confinement.py`` tries every page with paths outside the root and scans
``views/`` for direct reads).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import dora_analysis as da

ROOT_ENV = "DORA_DASHBOARD_ROOT"
HUB_ENV = "DORA_DASHBOARD_HUB"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
#: A folder with more entries than this is not a checkpoint; refusing it bounds the link check.
MAX_ENTRIES = 20_000


class AccessError(da.DoraAnalysisError, PermissionError):
    """A visitor asked for something this dashboard does not serve."""


def is_loopback(address: str | None) -> bool:
    """Whether a server bound to ``address`` is reachable from this machine only.

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback(""), is_loopback("0.0.0.0")
        (True, False, False)
    """
    if not address:  # Streamlit's default: every interface
        return False
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Readable:
    """A reference this dashboard has checked and may hand to the library.

    Made by :meth:`Access.resolve` for what a visitor typed, and by the app itself for the
    server's own files (an upload, a checkpoint folder inside a run folder just checked); pages
    never make one.
    """

    ref: str
    """What the library reads: a path, or a Hub id where those are allowed."""

    @contextmanager
    def opened(self) -> Iterator[str]:
        """The reference to read, for the duration of the ``with`` block."""
        yield self.ref


def require(source: object) -> Readable:
    """``source`` itself if it passed the access check; refuses anything else (a bug in a page)."""
    if not isinstance(source, Readable):
        raise TypeError(f"{source!r} has not been through the dashboard's access check; "
                        "get it from Access.resolve")
    return source


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class Access:
    """The dashboard's reading policy, decided once at start-up."""

    root: str | None = None
    """Real path of the data root, or None."""
    served: bool = False
    """The server is reachable from other machines."""
    hub: bool = False
    """Hub ids are allowed while confined."""

    @classmethod
    def from_settings(cls, address: str | None, env: Mapping[str, str] = os.environ,
                      argv: Sequence[str] = ()) -> Access:
        """From the server address, the environment and the script's own arguments."""
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--root")
        parser.add_argument("--allow-hub", action="store_true")
        args, _ = parser.parse_known_args(list(argv))
        root = args.root or env.get(ROOT_ENV) or None
        if root is not None:
            root = os.path.realpath(os.path.expanduser(root))
            if not os.path.isdir(root):
                raise AccessError(f"data root {root} is not a folder; fix {ROOT_ENV} or --root")
        return cls(root=root, served=not is_loopback(address),
                   hub=args.allow_hub or env.get(HUB_ENV, "") not in ("", "0"))

    @property
    def confined(self) -> bool:
        return self.root is not None

    def describe(self) -> str | None:
        """One sentence for the page when reading is restricted, else None."""
        if self.confined:
            return (f"Paths are read under the data root {self.root}"
                    + ("." if self.hub else "; Hub ids are off on this server."))
        if self.served:
            return ("This dashboard is served to other machines without a data root: typed "
                    f"paths are off (name one with {ROOT_ENV}). Demo data and uploads work.")
        return None

    def resolve(self, text: str) -> Readable:
        """The reference the library should read for what a visitor typed (or a table names).

        Raises :class:`AccessError` for anything this dashboard does not serve.
        """
        return Readable(self._reference(str(text)))

    def _reference(self, text: str) -> str:
        text = text.strip()
        if not text:
            raise AccessError("give a path (or a Hub id)")
        if not self.confined:
            if self.served:
                raise AccessError(f"{text}: this dashboard is served to other machines and no "
                                  f"data root is named, so typed paths are not read (its owner "
                                  f"can set {ROOT_ENV})")
            return text
        real = os.path.realpath(os.path.join(self.root, text))  # an absolute text replaces root
        if _inside(real, self.root) and os.path.exists(real):
            self._check_links(real, text)
            return real
        if _HUB_ID.match(text):
            if self.hub:
                return text
            raise AccessError(f"{text}: not under the data root, and Hub ids are off on this "
                              f"server (its owner can allow them with {HUB_ENV}=1)")
        raise AccessError(f"{text}: no such file or folder under the data root")

    def _check_links(self, real: str, text: str) -> None:
        """Every link inside a folder to be read must stay inside the root too."""
        if not os.path.isdir(real):
            return
        seen = 0
        # Links to folders are followed (the reader would), each checked before it is entered.
        for folder, dirs, files in os.walk(real, followlinks=True):
            for name in (*dirs, *files):
                seen += 1
                if seen > MAX_ENTRIES:
                    raise AccessError(f"{text}: more than {MAX_ENTRIES} entries; give the "
                                      "checkpoint's own folder")
                entry = os.path.join(folder, name)
                if os.path.islink(entry) and not _inside(os.path.realpath(entry), self.root):
                    raise AccessError(f"{text}: holds a link that leads outside the data root "
                                      f"({os.path.relpath(entry, real)}); it is not read")


def current(address: str | None) -> Access:
    """The policy for this server process (its address from ``server.address``)."""
    return Access.from_settings(address, os.environ, sys.argv[1:])
