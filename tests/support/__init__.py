"""Shared test support: helpers several test modules and benches use (containerd, a booted VM,
netns, cgroup sweeps, the guest image, a Task service served over ttrpc). Tests import these
instead of each other's private helpers."""
