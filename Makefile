# The two commands a newcomer needs:
#   make demo   - install everything, start a local Kafka broker and a worker, run a
#                 simulated fleet of agents and print alerts as they arrive
#   make test   - install everything (including the test tools) and run the test suite
# Both work from nothing: a Python virtualenv, Python packages from PyPI, the Kafka
# broker's jars through Maven, Alertmanager through apt-get.

PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test bench system-deps clean frameworks

$(BIN)/agentwatch: pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python >= 3.11 is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[server,test]'
	@touch $@

# Java 17+ and Maven run the real Kafka broker; Alertmanager is a real peer in tests;
# PostgreSQL 15 with pgaudit is the real audited database of the pgaudit tests; OpenSSL checks
# the kill-switch test vectors as an agent in another language would.
PG_BIN := /usr/lib/postgresql/15/bin
system-deps:
	@need=""; \
	command -v java >/dev/null 2>&1 || need="$$need openjdk-17-jre-headless"; \
	command -v mvn >/dev/null 2>&1 || need="$$need maven"; \
	command -v prometheus-alertmanager >/dev/null 2>&1 || need="$$need prometheus-alertmanager"; \
	command -v promtool >/dev/null 2>&1 || need="$$need prometheus"; \
	command -v openssl >/dev/null 2>&1 || need="$$need openssl"; \
	test -x $(PG_BIN)/postgres || need="$$need postgresql-15"; \
	test -f /usr/lib/postgresql/15/lib/pgaudit.so || need="$$need postgresql-15-pgaudit"; \
	if [ -n "$$need" ]; then \
		echo "installing with apt-get:$$need"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$need >/dev/null; \
	fi

demo: system-deps $(BIN)/agentwatch
	$(BIN)/agentwatch demo

# One virtualenv per agent framework of the test matrix (tests/frameworks/requirements/*.txt):
# their dependencies clash with ours and each other. Created once, reused while unchanged.
frameworks: $(BIN)/agentwatch
	$(BIN)/python -m tests.frameworks.venvs

test: system-deps $(BIN)/agentwatch frameworks
	$(BIN)/pytest -q -ra -n 2 --dist loadfile

bench: system-deps $(BIN)/agentwatch
	$(BIN)/agentwatch bench $(BENCH_ARGS)

clean:
	-$(BIN)/agentwatch broker down
	rm -rf $(VENV) .agentwatch .venv-frameworks
