# The two commands a newcomer needs:
#   make demo   set up .venv, index the sample clips that ship offline, ask "when does ..." of them
#   make test   set up .venv, run the checks (ruff, import-linter, mypy) and the whole test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo check test test-fast browser clean

setup: $(VENV)/.installed

# torch is installed first with an exact pin: a looser requirement pulls multi-GB CUDA builds.
# pyproject.toml declares ranges; constraints.txt pins the exact versions CI tests (see its header).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/ray-vlm demo

# The web page's test drives headless Chromium (Debian's package); the speech tests and benchmark speak their
# sentences with espeak-ng (Debian's package). Installed here when missing and possible.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the browser test will fail (apt-get install chromium)"; }
	@command -v espeak-ng >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	  && (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null 2>&1 \
	      || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null)) \
	  || echo "espeak-ng not installed: the speech tests will fail (apt-get install espeak-ng)"; }

# The checks: lint (rules in pyproject.toml), the layers (import-linter contracts), types (mypy). import-linter
# and mypy read the package as installed: tools/layout.py links operators/ and pipelines/ into it.
check: setup
	$(BIN)/ruff check ray_vlm operators pipelines benchmarks tests tools
	$(BIN)/python tools/layout.py >/dev/null
	cd build/layout && PYTHONPATH=. ../../$(BIN)/lint-imports --no-cache ../../pyproject.toml
	$(BIN)/mypy

# pytest exits 5 when it collects nothing; that is a failure of the suite, never a pass.
test: setup browser check
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) demo_store .pytest_cache
