# apo_ray: `make setup` builds .venv from this repo's own files (idempotent); `make test` / `make demo` need it.
SHELL := /bin/bash
PY := .venv/bin/python
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.venv/torch_extensions
APT_PKGS := libegl1 libgl1 libgles2 libglvnd0 libopengl0 libegl-mesa0 libgl1-mesa-dri

.PHONY: setup apt test test-all lint demo smoke bench chaos clean

setup: .venv/.stamp

apt:
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages for EGL rendering: $$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null; \
	fi

# torch==2.13.0 must be resolved in the same pip command as everything else (local CPU wheel).
.venv/.stamp: pyproject.toml Makefile
	@$(MAKE) --no-print-directory apt
	@test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -c "import apo_ray, envs, robosuite, robomimic, ray, deepspeed, transformers"
	@touch $@

test: setup
	$(PY) -m pytest -x -m "not slow" -n 2 --dist loadgroup --durations=15 tests

test-all: setup
	$(PY) -m pytest -x -n 2 --dist loadgroup tests

lint: setup
	.venv/bin/ruff check apo_ray envs jobs tests scripts

demo: setup
	.venv/bin/apo-ray loop --config configs/demo.yaml --run-dir runs/demo

smoke: setup
	.venv/bin/apo-ray loop --config configs/smoke.yaml --run-dir runs/smoke

bench: setup
	.venv/bin/apo-ray bench rollout
	.venv/bin/apo-ray bench data
	.venv/bin/apo-ray bench train

chaos: setup
	$(PY) -m apo_ray.chaos --config configs/smoke.yaml --kills 20

clean:
	rm -rf runs .pytest_cache
