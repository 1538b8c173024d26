"""The kata agent API: :mod:`agent_api.agent` runs in the guest, :mod:`agent_api.client` on the
host, and :mod:`agent_api.oci_codec` (OCI JSON ↔ kata protobuf) is shared by both."""
