# Two entry points for a fresh machine: `make demo` (the CPU demo) and `make test` (the test suite).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
RUN_DIR ?= runs/fmnist-demo
DEMO_MINUTES ?= 10

.PHONY: install demo test test-slow bench-step bench-demo toy clean

# System data (Fashion-MNIST from Debian) when apt is available, then the package and its test extras.
install:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "note: could not apt-get install dataset-fashion-mnist; pmf will download Fashion-MNIST instead"; fi
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q "torch>=2.13,<2.14"  # the tested range (pyproject.toml)
	$(PIP) install -q -e ".[test,tensorboard,diffusers]"
	$(PIP) install -q --no-deps "torch-fidelity==0.4.0"  # the FID cross-check; --no-deps: no torchvision / CUDA torch
	$(PIP) install -q "orbax-checkpoint==0.6.4" "jax[cpu]==0.4.34" "flax==0.10.0" || \
	  echo "note: could not install orbax-checkpoint 0.6.4 (the official pin); tests/test_official_jax.py's restore check will skip"

# The main job: train the Fashion-MNIST preset on CPU for ~10 minutes, then the 1-/2-step metrics and a grid.
demo: install
	$(PYTHON) -m pmf train --preset fmnist-demo --run-dir $(RUN_DIR) --minutes $(DEMO_MINUTES)
	$(PYTHON) -m pmf eval --checkpoint $(RUN_DIR)
	$(PYTHON) -m pmf sample --checkpoint $(RUN_DIR) --steps 1 --out $(RUN_DIR)/grid-1step.png
	@echo "grid: $(RUN_DIR)/grid-1step.png   metrics: $(RUN_DIR)/metrics.json"

test: install
	$(PYTHON) -m ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -x --durations=10

test-slow: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m slow --durations=10

bench-step: install
	$(PYTHON) benchmarks/step.py

bench-demo: install
	$(PYTHON) benchmarks/demo.py

toy: install
	$(PYTHON) -m pmf toy --out runs/toy

clean:
	rm -rf runs .pytest_cache
