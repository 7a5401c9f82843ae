# Set-up and everyday commands. Each target creates or updates ./.venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint default-model browser clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# A headless Chromium for the browser test (Debian's package; needs root or sudo).
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

demo: $(STAMP)
	$(BIN)/python app.py

# pytest's exit 5 means no test ran: that is a failure, not a pass.
test: $(STAMP) browser
	$(BIN)/python -m pytest -q; rc=$$?; [ $$rc -ne 5 ] || echo "no tests were collected" >&2; [ $$rc -eq 0 ]

test-slow: $(STAMP) browser
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .

default-model: $(STAMP)
	$(BIN)/mm train configs/shapes-tiny.json --out runs/shapes-tiny --export mm/default_model

clean-venv:
	rm -rf $(VENV)
