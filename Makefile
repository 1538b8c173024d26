# kata-colo: the two commands a newcomer runs are `make demo` and `make test`.
# Both go through `make setup`, which installs everything on a fresh Debian bookworm machine
# (apt packages, the Python package with its console scripts, the guest image), idempotently.
SHELL := /bin/bash
PYTHON ?= python3
APT_PACKAGES := qemu-system-x86 containerd runc containernetworking-plugins busybox-static \
	kmod cpio e2fsprogs erofs-utils iproute2 iperf3 xz-utils zstd binutils prometheus \
	gcc libc6-dev libcurl4-openssl-dev nginx-light stress-ng rt-tests
PYTEST_ARGS ?=

MYPY_PACKAGES := common ttrpc shim hypervisor agent_api/client agent_api/oci_codec.py cri ctl monitor deviceplugin \
	resourced
CONFIG_DIR := /etc/kata-colo

.PHONY: setup apt python config image lint test unit demo bench clean-state

setup: apt python config image

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "apt: all packages present"; fi

python:
	$(PYTHON) -m pip install -q --disable-pip-version-check "setuptools>=65" wheel "grpcio-tools>=1.60" "Cython>=3.0"
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-build-isolation -e '.[test]'
	$(PYTHON) proto/build.py
	$(PYTHON) setup.py -q build_ext --inplace
	@scripts=$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))'); \
	for s in containerd-shim-kata-colo-v2 kata-colo-ctl kata-colo-monitor kata-colo-device-plugin kata-colo-resourced kata-colo-vmcache; do \
	  ln -sf $$scripts/$$s /usr/local/bin/$$s; done

# The configuration with commented defaults; a file the user already has is never overwritten.
config:
	@install -d -m 0755 $(CONFIG_DIR)
	@if [ -e $(CONFIG_DIR)/configuration.toml ]; then \
	  echo "config: $(CONFIG_DIR)/configuration.toml exists, kept"; \
	else install -m 0644 shim/defaults/configuration.toml $(CONFIG_DIR)/configuration.toml; \
	  echo "config: installed $(CONFIG_DIR)/configuration.toml"; fi

image: python
	$(PYTHON) vm-images/build.py

lint: python
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy $(MYPY_PACKAGES)

test: setup lint
	$(PYTHON) -m pytest -q -rs $(PYTEST_ARGS)

unit: python
	$(PYTHON) -m pytest -q tests/unit $(PYTEST_ARGS)

demo: setup
	bash scripts/demo.sh

bench: setup
	$(PYTHON) -m bench
