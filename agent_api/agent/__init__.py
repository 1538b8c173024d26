"""The in-guest kata-colo agent: serves kata's grpc.AgentService / grpc.Health over ttrpc.

Runs under the guest's python3.11 with only the stdlib, protobuf and our own packages.
"""
from common.version import VERSION as AGENT_VERSION

__all__ = ["AGENT_VERSION"]
