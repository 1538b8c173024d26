"""kata-colo-resourced: the node resource agent (the seeds' "resource agent", Koordinator's
koordlet in miniature). One sampling loop reads the host (node CPU, the online and offline tiers'
cgroups); each registered policy (:mod:`resourced.policies`) turns the samples into knob
changes as a pure function; the daemon applies them (or only logs them with ``--dry-run``),
logs every decision and exports metrics on its own ``/metrics``."""
