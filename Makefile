# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo fashion-mnist test test-slow lint format clean

# The core install (no TensorFlow, no PyTorch) is all the demo needs; the tests add the extras ([test]).
$(BIN)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.installed: $(BIN)/.core
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# The main job: ResNet-20 on Fashion-MNIST (configs/fashion_mnist_resnet20.py).
demo: $(BIN)/.core fashion-mnist
	$(BIN)/resnet-jax train --config fashion_mnist_resnet20 --workdir runs/fashion_mnist_resnet20 \
	  --config.parallelism=batch_parts

# Fashion-MNIST downloaded from its publisher and checked (into ~/.cache/resnet-jax/datasets, no root needed);
# where that cannot be reached, Debian's package dataset-fashion-mnist (installed already, or through apt).
fashion-mnist: $(BIN)/.core
	@$(BIN)/resnet-jax download fashion_mnist && exit 0; \
	if [ -d $(FASHION_MNIST) ]; then echo "Using Debian's dataset-fashion-mnist in $(FASHION_MNIST)"; exit 0; fi; \
	echo "Trying Debian's package dataset-fashion-mnist instead"; \
	if command -v apt-get >/dev/null && $(SUDO) apt-get update -qq && \
	   $(SUDO) apt-get install -y -qq dataset-fashion-mnist; then exit 0; fi; \
	echo "No Fashion-MNIST: fetch its files by hand as the download error above says"; exit 1

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two workers: most of the suite is compiling, which uses one core at a time; the 20 slowest tests are listed.
test: lint
	$(BIN)/pytest -m "not slow" --numprocesses 2 --durations=20

test-slow: $(BIN)/.installed
	$(BIN)/pytest -m slow

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
