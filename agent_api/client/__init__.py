"""Host side of the agent API: :mod:`~agent_api.client.rpc` (AgentClient, the per-RPC timeout
table), :mod:`~agent_api.client.transport` (virtio-serial, vsock, hybrid vsock),
:mod:`~agent_api.client.convert` (the one translation module) and
:mod:`~agent_api.client.facade` (GuestAgent, the sandbox's plain-value view). Never shipped to
the guest."""
