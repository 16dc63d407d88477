"""trio-upper: the lecture's uppercase TCP/UDP service, built on trio."""

from __future__ import annotations

from .errors import UserError
from .server import ServerConfig, ServerStats, UpperServer
from .transform import Uppercaser, upper_bytes

__all__ = [
    "ServerConfig",
    "ServerStats",
    "UpperServer",
    "Uppercaser",
    "UserError",
    "__version__",
    "upper_bytes",
]

__version__ = "0.1.0"
