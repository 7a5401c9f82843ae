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

# The bundled model: synthetic shards -> training -> chained-MTP stage -> bf16 export into the
# package -> scores.
SHAPES := data/shapes
default-model: $(STAMP)
	$(BIN)/mm shards synth --out $(SHAPES) --n 200000 --seed 0 --split train --workers 2
	$(BIN)/mm shards synth --out $(SHAPES) --n 2000 --seed 0 --split val
	$(BIN)/mm shards synth --out $(SHAPES) --n 1000 --seed 0 --split test
	rm -rf runs/shapes-tiny
	$(BIN)/mm train configs/shapes-tiny.json --out runs/shapes-tiny --export mm/default_model
	rm -rf runs/shapes-tiny-mtp
	$(BIN)/mm finetune --from mm/default_model --config configs/shapes-tiny-mtp.json --stage mtp --mtp-depths 4 \
	  --data '$(SHAPES)/train-{000000..000199}.tar' --out runs/shapes-tiny-mtp --export mm/default_model
	rm -rf runs/shapes-tiny-robust
	$(BIN)/mm finetune --from mm/default_model --config configs/shapes-tiny-robust.json --stage full \
	  --data '$(SHAPES)/train-{000000..000199}.tar' --val '$(SHAPES)/val-{000000..000001}.tar' \
	  --out runs/shapes-tiny-robust --export mm/default_model
	cp runs/shapes-tiny/loss.png mm/default_model/loss.png
	cp runs/shapes-tiny-robust/loss.png mm/default_model/loss_robust.png
	$(BIN)/mm calibrate --checkpoint mm/default_model
	$(BIN)/mm eval --checkpoint mm/default_model --data '$(SHAPES)/test-000000.tar' --changes \
	  --out mm/default_model/eval.json

clean-venv:
	rm -rf $(VENV)
