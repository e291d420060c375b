"""
The exceptions octotwist raises, sorted by whose fault the problem is.

As in h11, the class says who has to act: the caller (L{UsageError}), the job's
author (L{JobScriptError}), a peer on the network
(L{RemoteProtocolError}, L{AuthenticationError}, L{IntegrityError}) or the installation
(L{UnknownTransportError}, L{PluginError}).
"""

from __future__ import annotations


class OctotwistError(Exception):
    """Base class of every error octotwist raises on purpose."""


class UsageError(OctotwistError):
    """The caller asked for something that cannot work (bad option, bad endpoint)."""


class JobScriptError(OctotwistError):
    """The job script cannot be loaded, lacks a required name, or cannot be shipped."""


class UnknownTransportError(OctotwistError, ValueError):
    """No installed plugin provides the transport that was asked for."""

    def __init__(self, name: str, installed: list[str]) -> None:
        self.name = name
        self.installed = installed
        listing = ", ".join(installed) if installed else "none"
        super().__init__(f"unknown transport {name!r}; installed transports: {listing}")


class UnknownEngineError(OctotwistError, ValueError):
    """No installed plugin provides the engine that was asked for."""

    def __init__(self, name: str, installed: list[str]) -> None:
        self.name = name
        self.installed = installed
        listing = ", ".join(installed) if installed else "none"
        hint = f" (pip install 'octotwist[{name}]' installs it)" if name not in installed else ""
        super().__init__(f"unknown engine {name!r}; installed engines: {listing}{hint}")


class PluginError(OctotwistError):
    """A transport plugin is broken: it fails to import, or clashes with another."""


class ProtocolError(OctotwistError):
    """A connection broke the octotwist protocol."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid; that one connection is closed."""


class IntegrityError(RemoteProtocolError):
    """
    A frame from an authenticated peer failed its integrity check: it was
    altered, injected, replayed, reordered or dropped on the way, so someone
    on the path is tampering with the connection (or the peer is broken).
    The connection is closed; nothing in the frame was decoded.
    """


class AuthenticationError(RemoteProtocolError):
    """
    The peer could not prove who it is (the shared secret, a key, its user
    id), or it refused our proof.  Not retried: the message says what to fix.
    """
