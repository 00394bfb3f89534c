# Two commands matter: `make demo` and `make test`. Both install what they need first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PKGS := prosody nftables iproute2 profanity tmux gnupg go-sendxmpp postgresql chromium docker.io docker-compose debootstrap

.PHONY: demo test setup system-deps bench clean

demo: setup
	$(VENV)/bin/gridpresence demo

test: setup
	$(PY) -m pytest -q

setup: system-deps $(VENV)/.installed

# Debian packages: Prosody is the XMPP server the project starts as its own child process;
# profanity (driven through tmux) is the third-party chat client the tests log in with;
# postgresql is the server the historian's PostgreSQL backend is tested against (started by the test);
# chromium is the browser the dashboard test drives (Playwright with executable_path, never its own download).
# docker.io, docker-compose and debootstrap run the compose demo for real (tests/test_compose.py).
system-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	python3 -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

bench: setup
	$(PY) bench/fanout.py --signatures both
	$(PY) bench/signing.py
	$(PY) bench/presence_latency.py
	$(PY) bench/relay.py
	$(PY) bench/bosh.py
	$(PY) bench/chat.py
	$(PY) bench/gateway.py
	$(PY) bench/ox_chat.py
	$(PY) bench/rules_eval.py
	$(PY) bench/historian.py
	$(PY) bench/dashboard.py

clean:
	rm -rf $(VENV) .gridpresence .pytest_cache
