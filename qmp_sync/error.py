"""
The root of qmp_sync's exceptions.

Every error that qmp_sync raises on its own account derives from
`QMPError`; a peer that breaks the rules of the protocol raises a
`ProtocolError`. The more specific classes live beside the layer that
raises them (`qmp_sync.protocol`, `qmp_sync.qmp_client`), and the most
useful ones are re-exported by the package.
"""

from __future__ import annotations

__all__ = ("ProtocolError", "QMPError")


class QMPError(Exception):
    """Base class for every exception qmp_sync raises itself."""


class ProtocolError(QMPError):
    """
    The peer broke the protocol: it sent something that cannot be a
    valid message here (malformed, oversized, truncated or unexpected).

    A protocol error ends the session; the calls in flight end with an
    error that names this one as its cause.

    :param error_message: What happened, in words.
    """

    def __init__(self, error_message: str):
        super().__init__(error_message)
        #: What happened, in words.
        self.error_message = error_message
