"""
`QEMUMonitorProtocol`: a drop-in for ``qemu.qmp.legacy``'s class of the
same name, built on `QMPSyncClient`.

Same names, signatures, return values (plain dicts) and exceptions, so
that changing the import is the whole migration. Unlike the original it
runs no event loop in the caller's thread, so it works inside a running
event loop and from several threads, and it queues events while the
caller is idle. Where the original is wrong, this one is right, and the
docstring says so.

Threads: everything here runs in caller threads.
"""

from __future__ import annotations

import re
import socket
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .error import QMPError
from .protocol import Runstate, SocketAddr, SocketAddrT
from .qmp_client import QMPClient
from .sync import QMPSyncClient
from .util import timeout_seconds

if TYPE_CHECKING:
    from typing_extensions import Self

# Every public name of qemu.qmp.legacy, so that changing the import is
# the whole migration.
__all__ = (
    "QEMUMonitorProtocol",
    "QMPBadPortError",
    "QMPClient",
    "QMPError",
    "QMPMessage",
    "QMPObject",
    "QMPReturnValue",
    "Runstate",
    "SocketAddrT",
)

#: An entire QMP message of any kind, as a plain dict.
QMPMessage = dict[str, Any]
#: The ``return`` value of a command.
QMPReturnValue = object
#: Any object in a QMP message.
QMPObject = dict[str, object]

# "host:port" or "[ipv6]:port"; anything else is a unix socket path.
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*))"
                        r":(?P<port>[^:]*)$")


class QMPBadPortError(QMPError):
    """The port of a ``host:port`` address is not a number."""


class QEMUMonitorProtocol:
    """
    A blocking QMP connection with the interface of QEMU's original
    ``QEMUMonitorProtocol``.

    :param address: A unix socket path, a ``(host, port)`` tuple, or a
        connected `socket.socket`.
    :param server: Listen at `address` for QEMU to connect (then call
        `accept`) instead of connecting to it.
    :param nickname: A nickname for logs.
    :raise ValueError: For ``server=True`` with a socket.
    :raise ConnectError: When listening fails.
    """

    def __init__(self, address: SocketAddr | socket.socket,
                 server: bool = False, nickname: str | None = None) -> None:
        if server and isinstance(address, socket.socket):
            raise ValueError(
                "server must be False when passing a socket")
        self._qmp = QMPSyncClient(address, name=nickname)
        self._timeout: float | None = None
        if server:
            assert not isinstance(address, socket.socket)
            self._qmp.start_server(address)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc_value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    @classmethod
    def parse_address(cls, address: str) -> SocketAddr:
        """
        Parse ``host:port`` or ``[ipv6-host]:port`` into a ``(host,
        port)`` tuple; anything else is a unix socket path and returned
        as it is.

        (The original takes ``[::1]:4444`` for a path; so do bare IPv6
        addresses here, which cannot carry a port unbracketed.)

        :raise QMPBadPortError: When the port is not a number.
        """
        found = _HOST_PORT.match(address)
        if found is None:
            return address
        port = found.group("port")
        try:
            number = int(port)
        except ValueError:
            raise QMPBadPortError(
                f"Bad port: '{port}' in '{address}'.") from None
        host = found.group("v6")
        if host is None:
            host = found.group("host")
        return (host, number)

    def _greeting(self) -> QMPMessage | None:
        greeting = self._qmp.greeting
        return None if greeting is None else greeting.to_dict()

    def connect(self, negotiate: bool = True) -> QMPMessage | None:
        """
        Connect and (unless `negotiate` is False) negotiate capabilities.

        :return: The greeting, or None when `negotiate` is False.
        :raise ConnectError: When connecting fails.
        """
        self._qmp.connect(negotiate=negotiate)
        # Without negotiation QEMU's greeting may or may not have come
        # yet: None either way, as documented.
        return self._greeting() if negotiate else None

    def accept(self, timeout: float | None = 15.0) -> QMPMessage:
        """
        Wait for QEMU to connect to the listening socket, then negotiate.

        (After a timeout the original has stopped listening; here the
        socket keeps listening, so `accept` can be called again.)

        :param timeout: Seconds to wait at most; None waits forever.
        :return: The greeting.
        :raise TimeoutError: When `timeout` passes first.
        :raise ConnectError: When the session cannot be established.
        """
        self._qmp.accept(timeout=timeout)
        greeting = self._greeting()
        assert greeting is not None
        return greeting

    def cmd_obj(self, qmp_cmd: QMPMessage) -> QMPMessage:
        """
        Send a command message as it is; return the whole reply, error
        replies included.

        (The original sends a message without an id as it is, so that
        after one timed-out command every later call gets the reply of
        the one before. Here such a message carries a private id on the
        wire, removed from the reply returned: a late reply is dropped
        and every call gets its own.)

        :raise TimeoutError: When the `settimeout` timeout passes first.
        """
        return self._qmp.execute_reply(
            qmp_cmd, timeout=self._timeout).to_dict()

    def cmd_raw(self, name: str,
                args: dict[str, object] | None = None) -> QMPMessage:
        """
        Build a command from `name` and `args` and send it with
        `cmd_obj`; return the whole reply.
        """
        qmp_cmd: QMPMessage = {"execute": name}
        if args:
            qmp_cmd["arguments"] = args
        return self.cmd_obj(qmp_cmd)

    def cmd(self, cmd: str, **kwds: object) -> QMPReturnValue:
        """
        Execute a command; return its ``return`` value.

        :raise ExecuteError: When the server answers with an error.
        :raise TimeoutError: When the `settimeout` timeout passes first.
        """
        return self._qmp.execute(cmd, kwds, timeout=self._timeout)

    def pull_event(self, wait: bool | float = False) -> QMPMessage | None:
        """
        Take the oldest queued event.

        (The original waits forever when `wait` is an int; here any
        number is seconds.)

        :param wait: False or 0: do not wait (None when nothing is
            queued); True: wait until an event comes; a number: wait
            that many seconds at most.
        :raise TimeoutError: When a number of seconds passes first.
        """
        event = self._qmp.pull_event(wait)
        return None if event is None else event.to_dict()

    def get_events(self, wait: bool | float = False) -> list[QMPMessage]:
        """
        Take every queued event; when none is queued and `wait` asks for
        it (as in `pull_event`), wait for one first.

        :raise TimeoutError: When a number of seconds passes first.
        """
        return [event.to_dict() for event in self._qmp.get_events(wait)]

    def clear_events(self) -> None:
        """Drop every queued event."""
        self._qmp.clear_events()

    def close(self) -> None:
        """Close the connection (or stop listening); idempotent."""
        self._qmp.close()

    def settimeout(self, timeout: float | None) -> None:
        """
        Set the timeout of `cmd`, `cmd_obj` and `cmd_raw`, in seconds
        (None or infinity: wait as long as it takes).

        :raise ValueError: For NaN or a negative number (the original
            accepts them, and fails at the next command).
        """
        self._timeout = timeout_seconds(timeout)

    def send_fd_scm(self, fd: int) -> None:
        """Pass file descriptor `fd` to QEMU (SCM_RIGHTS)."""
        self._qmp.send_fd_scm(fd)

    @property
    def runstate(self) -> Runstate:
        """The runstate of the connection (not in the original)."""
        return self._qmp.runstate
