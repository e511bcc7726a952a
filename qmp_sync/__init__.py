"""
qmp_sync: a QMP client for QEMU with an asyncio core.

``QMPClient`` is the asyncio client; its layers are, from the bottom:
``error``, ``util``, ``protocol`` (the generic core), ``message``,
``events`` and ``qmp_client``. README.rst has the tutorial.
"""

from .error import ProtocolError, QMPError
from .events import EventListener
from .message import Message
from .protocol import ConnectError, Runstate, StateError
from .qmp_client import ExecInterruptedError, ExecuteError, QMPClient

__all__ = (
    "ConnectError",
    "EventListener",
    "ExecInterruptedError",
    "ExecuteError",
    "Message",
    "ProtocolError",
    "QMPClient",
    "QMPError",
    "Runstate",
    "StateError",
)
