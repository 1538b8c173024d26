"""``kata-colo-ctl``: the SRE's command line over the shims' management sockets (like kata-ctl /
kata-runtime's metrics, exec and env). ``__main__`` parses and dispatches; ``render`` formats."""
