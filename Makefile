# tiermem: two commands do all set-up on a fresh Debian machine (as root):
#   make demo   boots the emulated CXL machine and runs the tiering demo
#   make test   runs the test suite (host + emulated CXL machine)
# Both install what they need (apt packages, a venv, the guest kernel) and are quick the
# second time (stamp files under .stamps/).

VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(VENV)/bin/pip
STAMPS   := .stamps
APT_PKGS := qemu-system-x86 python3-bpfcc bpfcc-tools python3-venv python3-dev gcc make \
            busybox-static cpio kmod valgrind numactl curl xz-utils zstd
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: all setup apt venv guest test test-host demo bench clean distclean

all: setup

$(STAMPS):
	mkdir -p $(STAMPS)

# System packages (Debian). Skipped when every package is already installed.
$(STAMPS)/apt: | $(STAMPS)
	@if dpkg-query -W -f='$${Status}\n' $(APT_PKGS) 2>/dev/null | grep -vq 'install ok installed' \
	   || [ $$(dpkg-query -W -f='$${Status}\n' $(APT_PKGS) 2>/dev/null | wc -l) -lt $(words $(APT_PKGS)) ]; then \
	  echo "== installing Debian packages: $(APT_PKGS)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PKGS); \
	fi
	touch $@

# A venv from Debian's python3 with system site packages, so bcc (python3-bpfcc) imports.
NATIVE_SRC := $(wildcard tiermem/native/*.[ch] tiermem/native/build.py cxlfork/native/*.[ch] cxlfork/native/*.ld cxlfork/native/build*.py)
$(STAMPS)/venv: $(STAMPS)/apt pyproject.toml setup.py $(NATIVE_SRC) | $(STAMPS)
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel cffi
	$(PIP) install -q -e '.[test]'
	touch $@

# The emulated CXL machine's kernel and initramfs (cached under /var/cache/tiermem).
$(STAMPS)/guest: $(STAMPS)/venv | $(STAMPS)
	$(PY) -m emulation prepare
	touch $@

# Kernel headers bcc compiles against, for the host and the guest kernel (after guest).
$(STAMPS)/bcc: $(STAMPS)/guest scripts/bcc-headers.sh | $(STAMPS)
	sh scripts/bcc-headers.sh
	touch $@

setup: $(STAMPS)/venv

# The porter's workers: the LLM worker's weights (deterministic, random; safetensors under
# /var/cache/tiermem/llm) and the C worker binary (/var/cache/tiermem/workers).
$(STAMPS)/porter-workers: $(STAMPS)/venv cxlfork/workers/llm_weights.py cxlfork/workers/wordcount.c | $(STAMPS)
	$(PY) -m cxlfork.workers.llm_weights
	$(PY) -m cxlfork.workers.build_c
	touch $@

guest: $(STAMPS)/guest

test: $(STAMPS)/guest $(STAMPS)/bcc $(STAMPS)/porter-workers
	$(PY) -m pytest -ra tests

test-host: $(STAMPS)/venv $(STAMPS)/porter-workers
	$(PY) -m pytest -ra -m "not vm" tests

demo: $(STAMPS)/guest $(STAMPS)/bcc
	$(PY) -m emulation demo

bench: $(STAMPS)/guest $(STAMPS)/bcc $(STAMPS)/porter-workers
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf build *.egg-info tiermem/_native*.so tiermem/_native.c tiermem/_native.o .pytest_cache

distclean: clean
	rm -rf $(VENV) $(STAMPS)
