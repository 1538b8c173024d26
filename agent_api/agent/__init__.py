"""The in-guest kata-colo agent: serves kata's grpc.AgentService / grpc.Health over ttrpc.

Runs under the guest's python3.11 with only the stdlib, protobuf and our own packages.
"""
AGENT_VERSION = "0.1.0"
