# rafs developer entry points. `make setup` is idempotent and quick when done:
# apt runs only when a package is missing, pip only when pyproject.toml changed.

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.rafs-installed
PYTEST_ARGS ?=

APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc erofs-utils umoci skopeo debootstrap \
	runc containerd docker-registry zstd ca-certificates stargz-snapshotter \
	tinyproxy-bin
# python3-dev only when the interpreter we build the venv from has no headers.
PY_HAS_HEADERS := $(shell $(PYTHON) -c 'import os, sysconfig; \
	print(int(os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))))' \
	2>/dev/null)
ifneq ($(PY_HAS_HEADERS),1)
APT_PACKAGES += python3-dev
endif
# Debian's own python3 can make a venv only with python3-venv (ensurepip).
PY_HAS_ENSUREPIP := $(shell $(PYTHON) -c 'import ensurepip; print(1)' 2>/dev/null)
ifneq ($(PY_HAS_ENSUREPIP),1)
APT_PACKAGES += python3-venv
endif

.PHONY: setup apt-packages fuse-device test demo bench bench-deps lint clean protos

setup: apt-packages fuse-device $(STAMP)

apt-packages:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q '^install ok installed$$' \
			|| echo "$$p"; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "setup: missing packages ($$missing) and not root: install them as root" >&2; \
			exit 1; \
		fi; \
		echo "setup: installing" $$missing; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi

fuse-device:
	@if [ ! -e /dev/fuse ]; then \
		modprobe fuse 2>/dev/null || true; \
		[ -e /dev/fuse ] || mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || true; \
	fi; \
	if [ ! -c /dev/fuse ]; then echo "setup: warning: /dev/fuse is missing" >&2; fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

test: setup
	$(VPY) -m pytest -q tests $(PYTEST_ARGS)

demo: setup
	$(VPY) -m bench.demo

# The full cold-start benchmark (rafs bench): JSON, markdown table and plots in results/.
bench: setup
	$(VPY) -m runtime.cli bench --out results

# Only for `rafs bench --against estargz` (which does this itself on first use):
# apt-get install golang-go golang-github-containerd-stargz-snapshotter-dev and build
# the eStargz peer into /var/cache/rafs/peers/.
bench-deps: setup
	$(VPY) -m bench.peers.estargz

lint: setup
	$(VENV)/bin/ruff check .

# The gRPC stubs (committed; run after editing a .proto): containerd's snapshots API,
# and CRI's (k8s.io/cri-api runtime/v1: the snapshotter's image-service proxy, the
# tests' CRI client).
PROTOS := snapshotter/api/containerd/types/mount.proto \
	snapshotter/api/containerd/services/snapshots/v1/snapshots.proto \
	snapshotter/api/k8s/runtime/v1/api.proto
protos: setup
	$(VPY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	rm -f snapshotter/api/containerd/types/mount_pb2_grpc.py

# $(DEMO_WORK): what `python -m bench.demo --keep` (and a demo killed midway) leaves.
DEMO_WORK := /var/tmp/rafs-demo

clean:
	@if grep -q " $(DEMO_WORK)/" /proc/self/mountinfo; then \
		echo "clean: something is mounted under $(DEMO_WORK); unmount it first" >&2; exit 1; fi
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis $(DEMO_WORK)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
