# kata-colo: the two commands a newcomer runs are `make demo` and `make test`.
# Both go through `make setup`, which installs everything on a fresh Debian bookworm machine
# (apt packages, the Python package with its console scripts, the guest image), idempotently.
SHELL := /bin/bash
PYTHON ?= python3
APT_PACKAGES := qemu-system-x86 containerd runc containernetworking-plugins busybox-static \
	kmod cpio e2fsprogs iproute2 iperf3 xz-utils zstd binutils
PYTEST_ARGS ?=

.PHONY: setup apt python image test unit demo bench clean-state

setup: apt python image

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
	for s in containerd-shim-kata-colo-v2; do ln -sf $$scripts/$$s /usr/local/bin/$$s; done

image: python
	$(PYTHON) vm-images/build.py

test: setup
	$(PYTHON) -m pytest -q -rs $(PYTEST_ARGS)

unit: python
	$(PYTHON) -m pytest -q tests/unit $(PYTEST_ARGS)

demo: setup
	bash scripts/demo.sh

bench: setup
	$(PYTHON) -m bench
