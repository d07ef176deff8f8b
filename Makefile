# svmotion: every target does its own set-up on a fresh Debian 12 machine, and is idempotent.
VENV    := .venv
PY      := $(VENV)/bin/python
# nbdfuse comes in libnbd-bin: Debian 12's "nbdfuse" is only a name libnbd-bin provides, which
# dpkg never reports as installed, so listing it made every run call apt-get update.
DEB_PKGS := nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd fuse3 \
            qemu-utils qemu-system-common qemu-system-x86 prometheus fio python3-venv \
            e2fsprogs util-linux iproute2 kmod strace python3-cryptography openssl \
            vagrant shellcheck rsync python3-click python3-prometheus-client python3-pyroute2
# vagrant, shellcheck: tests/lab checks the Vagrant lab's files. rsync and the python3-* modules:
# the lab's hosts run svmotion with Debian's own python3, as vagrant/provision.sh installs it.
# vagrant-libvirt: `vagrant validate` then checks the libvirt provider's settings too. Without its
# recommends (an NFS server, libguestfs): validation needs none of them. systemd-container,
# debootstrap: tests/lab boots Debian 12 machines with systemd (svlab/nspawn.py).
DEB_PKGS_NO_RECOMMENDS := vagrant-libvirt systemd-container debootstrap
PYTEST_ARGS ?=
FAULTS_ARGS ?=

.PHONY: setup deps venv demo test bench faults lab lab-down lab-status lab-migrate clean

setup: deps venv

# Debian packages: installed only when one is missing, so a second run costs a dpkg query.
deps:
	@missing=$$(for p in $(DEB_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@missing=$$(for p in $(DEB_PKGS_NO_RECOMMENDS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (without recommends):" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The venv must come from Debian's Python: nbdkit embeds it, and libnbd's bindings exist only there.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c 'import nbd, click, prometheus_client, pyroute2, cryptography'
	touch $@

venv: $(VENV)/.installed

demo: setup
	$(VENV)/bin/svmotion demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks --out bench

# The randomized fault campaign (README, "Fault campaign"): 100 trials by default, e.g.
# make faults FAULTS_ARGS="--trials 20 --seed 7" or FAULTS_ARGS="--trial-seed 123456".
faults: setup
	$(PY) -m faults --out faults-results $(FAULTS_ARGS)

# The lab on this machine (README, "Lab"): src, dst, mon as network namespaces, provisioned by
# vagrant/provision.sh; `make lab-migrate` moves the guest's disk to dst and back.
LAB_DIR ?= /var/tmp/svlab
lab: setup
	$(VENV)/bin/svmotion lab --dir $(LAB_DIR) up

lab-down:
	$(VENV)/bin/svmotion lab --dir $(LAB_DIR) down

lab-status:
	$(VENV)/bin/svmotion lab --dir $(LAB_DIR) status

lab-migrate:
	$(VENV)/bin/svmotion lab --dir $(LAB_DIR) migrate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
