"""kata-colo's asyncio ttrpc 1.1.1 (containerd's lightweight RPC): client and server."""
from ttrpc.client import Client
from ttrpc.framing import MAX_PAYLOAD
from ttrpc.server import Handler, Server, ServerContext
from ttrpc.stream import open_fd_stream

__all__ = ["Client", "Handler", "MAX_PAYLOAD", "Server", "ServerContext", "open_fd_stream"]
