"""kata-colo's asyncio ttrpc 1.1.1 (containerd's lightweight RPC): client and server."""
from ttrpc.client import Client
from ttrpc.framing import MAX_PAYLOAD
from ttrpc.server import Server, ServerContext

__all__ = ["Client", "Server", "ServerContext", "MAX_PAYLOAD"]
