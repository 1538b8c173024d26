"""The shim's management plane: per-sandbox HTTP on ``sbs/<id>/shim-monitor.sock``.

server.py (socket, lifecycle), auth.py (peer credentials), admin.py (routes and error
contract), view.py (the /colo/sandbox document), metrics.py (/metrics: kata_shim_*,
kata_hypervisor_*, kata_colo_*, guest), guest.py (the guest's metrics, validated and cached),
colo.py (per-priority cgroup facts), overhead.py (kata's pod overhead), procfs.py (/proc of the
shim and the VMM). Clients: ``kata-colo-ctl`` (ctl/) and ``kata-colo-monitor`` (monitor/).
"""
