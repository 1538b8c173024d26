"""``kata-colo-monitor``: the node daemon that scrapes every kata-colo shim (kata-monitor's role).

discovery.py (sandboxes from /run/kata-colo/sbs via inotify), cri.py (cri_* labels from CRI
ListPodSandbox), scrape.py (parallel shim scrapes, relabel and merge), server.py (the HTTP
endpoints and the kata_monitor_* families), __main__.py (flags and the event loop).
"""
