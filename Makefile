# Two commands: `make demo` runs the main job, `make test` runs the checks.
# Both create .venv on first use and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

APP_STAMP := $(VENV)/.installed-app

.PHONY: demo app test test-browser screenshots install lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch and torchvision first, pinned to the pair this machine installs from local files;
	# a GPU user installs the build for their CUDA version before `make` (see README).
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/spatiallock demo

# The layout editor (`spatiallock app`) needs Gradio and gradio-image-annotation besides the project.
$(APP_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,app,browser]"
	touch $(APP_STAMP)

app: $(APP_STAMP)
	$(BIN)/spatiallock app

lint: $(STAMP)
	$(BIN)/ruff check spatiallock tests benchmarks scripts
	$(BIN)/ruff format --check spatiallock tests benchmarks scripts
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest

# The page of `spatiallock app` in headless Chromium (Debian's package; Playwright drives it, no browser download).
test-browser: $(APP_STAMP)
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq chromium)
	$(BIN)/python -m pytest tests/browser --confcutdir=tests/browser -p no:cacheprovider -s

# docs/app.png, the README's picture of the page: the browser test that draws a layout and generates, writing its
# screenshot into docs/ (`make test-browser` writes it to a temporary folder and leaves the tracked files alone).
screenshots: $(APP_STAMP)
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq chromium)
	SPATIALLOCK_SCREENSHOTS=docs $(BIN)/python -m pytest \
		tests/browser/test_app.py::test_draw_label_generate_and_round_trip --confcutdir=tests/browser -p no:cacheprovider -s

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
