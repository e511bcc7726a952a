"""
qmp_sync: a QMP client for QEMU with an asyncio core.

``QMPSyncClient`` is the blocking, thread-safe client; ``QMPClient`` the
asyncio client under it. The layers, from the bottom: ``error``,
``util``, ``protocol`` (the generic core), ``message``, ``events``,
``qmp_client``, ``_loop`` (the crossing between threads),
``_event_queue`` (the blocking event queue), ``sync`` and ``legacy``.
README.rst has the tutorial.
"""

__version__ = "0.2.0"

from .error import ProtocolError, QMPError
from .events import EventListener
from .message import Message
from .protocol import ConnectError, Runstate, SocketAddrT, StateError
from .qmp_client import ExecInterruptedError, ExecuteError, QMPClient
from .sync import QMPSyncClient

__all__ = (
    "ConnectError",
    "EventListener",
    "ExecInterruptedError",
    "ExecuteError",
    "Message",
    "ProtocolError",
    "QMPClient",
    "QMPError",
    "QMPSyncClient",
    "Runstate",
    "SocketAddrT",
    "StateError",
)
