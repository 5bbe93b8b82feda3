# joinproxyd: `make demo` and `make test` are the two commands; both set everything up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Debian's own interpreter, so Debian's python3-nftables is importable from the venv.
SYSTEM_PYTHON := /usr/bin/python3

APT_PACKAGES := iproute2 ethtool tcpdump tshark socat nftables python3-nftables clang clang-16 llvm \
	libbpf-dev bpftool linux-libc-dev libsystemd-dev pkg-config autoconf automake libtool \
	python3-venv python3-dev libcoap3-bin openssl curl gcc make procps iputils-ping systemd \
	debhelper dh-python lintian python3-docutils python3-pip shellcheck \
	systemd-container debootstrap zstd netsniff-ng prometheus dnsmasq-base libyang2-tools postgresql \
	qemu-system-x86

.PHONY: setup apt venv bpf lint test test-vm fuzz demo deb ipk clean completion bench bench-readme

setup: apt venv bpf

apt:
	@tools/ensure-apt.sh $(APT_PACKAGES)

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml | apt
	@echo "setup: building $(VENV)"
	@[ -x $(PY) ] || $(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 \
		| grep -vE '^WARNING: Location|InformationOnly|^ *$$|name as your package|precedence during imports|warnings.warn' || true
	@$(PY) -c 'import nftables, cryptography, pycose, aiohttp, pyroute2, lakers, aiocoap.oscore, psycopg_pool, matplotlib' \
		|| { echo "setup: the venv is missing a dependency" >&2; exit 1; }
	@touch $@

bpf: | apt
	@$(MAKE) -s -C ebpf

lint: venv
	@$(VENV)/bin/ruff check --quiet .

test: setup
	@[ "$$(id -u)" -eq 0 ] || { echo "make test: run as root (the tests create network namespaces)" >&2; exit 1; }
	@$(VENV)/bin/ruff check --quiet . && echo "ruff: clean"
	$(PY) -m pytest

# What this machine kind's kernel cannot run (ip6ip6 tunnels: the ipip mode's kernel
# datapath, kernel/ip6tnl.py), in Debian's stock kernel under QEMU/TCG (tools/vm/,
# tests/vm/*.sh): the rootfs is built once into VM_ROOTFS (about a minute, cached), then one
# VM boots per job (about a minute each here). `make test` runs it too
# (tests/test_vm_stock_kernel.py), so CI does.
test-vm: setup
	@tools/vm/test-vm.sh

# A long fuzzing run: every decoder and network-facing handler harness (make test runs the same
# ones briefly, derandomized), FUZZ_EXAMPLES examples per property, fresh random inputs each run.
FUZZ_EXAMPLES ?= 20000
fuzz: setup
	BRSKI_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) BRSKI_FUZZ_RANDOM=1 $(PY) -m pytest --timeout=0 \
		-p no:cacheprovider tests/test_fuzz_decoders.py tests/test_fuzz_handlers.py \
		tests/test_wire_fuzz.py tests/test_voucher_fuzz.py

# Every benchmark of bench/ with its same-run baselines (bench/run_all.py), into build/bench/:
# report.json (every round), a PNG chart per benchmark and summary.md; about 25 minutes here.
# BENCH_ARGS="--quick" for a smoke run, "--only NAME,..." for some. `make bench-readme` then
# renders summary.md again from report.json and copies it into README.md's Benchmarks section
# (between the bench-summary markers); BENCH_ARGS='--note "..."' adds a remark to its header.
BENCH_ARGS ?=
bench: setup
	@[ "$$(id -u)" -eq 0 ] || { echo "make bench: run as root (most benchmarks create network namespaces)" >&2; exit 1; }
	$(PY) bench/run_all.py $(BENCH_ARGS)

bench-readme: venv
	$(PY) bench/run_all.py --readme $(BENCH_ARGS)

# DEMO_REGISTRARS=2: one domain, two registrars sharing a PostgreSQL store (lab/demo_cluster.py).
DEMO_REGISTRARS ?= 1
demo: setup
	@[ "$$(id -u)" -eq 0 ] || { echo "make demo: run as root (the demo creates network namespaces)" >&2; exit 1; }
	$(VENV)/bin/joinproxy-lab demo --registrars $(DEMO_REGISTRARS)

# Bash completion files from the programs' argparse parsers (committed; the test checks them).
completion: venv
	$(PY) tools/completion.py packaging/completion

# Debian packages (debhelper; sources in packaging/debian), per Debian release, each built in
# that release's own build root (debootstrap'ed once, cached in build/debroot/), into
# build/deb/<release>/, lintian-checked. `make deb DEBIAN_RELEASES=trixie` builds one.
DEBIAN_RELEASES ?= bookworm trixie
deb: setup
	@tools/build-deb.sh $(DEBIAN_RELEASES)

# OpenWrt package (packaging/openwrt) with the prebuilt BPF objects, into build/ipk/.
ipk: setup
	@tools/build-ipk.sh

clean:
	@$(MAKE) -s -C ebpf clean
	rm -rf $(VENV) build *.egg-info
