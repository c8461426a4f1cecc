# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo fashion-mnist test test-slow lint format clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# The main job: ResNet-20 on Fashion-MNIST (configs/fashion_mnist_resnet20.py).
demo: $(BIN)/.installed fashion-mnist
	$(BIN)/resnet-jax train --config configs/fashion_mnist_resnet20.py --workdir runs/fashion_mnist_resnet20 \
	  --config.parallelism=batch_parts

# Fashion-MNIST from Debian's package (apt), else from tfds (network), else say what to do.
fashion-mnist: $(BIN)/.installed
	@if [ -d $(FASHION_MNIST) ]; then exit 0; fi; \
	if command -v apt-get >/dev/null && $(SUDO) apt-get update -qq && \
	   $(SUDO) apt-get install -y -qq dataset-fashion-mnist; then exit 0; fi; \
	echo "apt could not install dataset-fashion-mnist; trying tensorflow-datasets (needs network)"; \
	$(BIN)/tfds build fashion_mnist || { \
	  echo "No Fashion-MNIST. Put the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,"; \
	  echo "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from the Fashion-MNIST repository in a folder"; \
	  echo "and run: $(BIN)/resnet-jax train --config configs/fashion_mnist_resnet20.py --workdir runs/fm --config.data_dir=FOLDER"; \
	  exit 1; }

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two workers: most of the suite is compiling, one core each; on 2 cores 9 minutes instead of 13.
test: lint
	$(BIN)/pytest -m "not slow" --numprocesses 2

test-slow: $(BIN)/.installed
	$(BIN)/pytest -m slow

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
