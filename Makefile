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

.PHONY: setup apt test test-all test-autoscale lint demo smoke bench chaos clean openvla-env

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

# The smoke loop on a local Ray autoscaling cluster (fake multi-node provider) against the embedded Ray (also in make test)
test-autoscale: setup
	$(PY) -m pytest -x -s -p no:cacheprovider tests/test_autoscaling.py

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
	$(PY) -m apo_ray.bench.chaos --config configs/smoke.yaml --kills 20

# A second venv pinned as OpenVLA's own code demands (modeling_prismatic refuses timm outside 0.9.10-0.9.16 and
# expects transformers 4.40.1 / tokenizers 0.19.1). timm and OpenVLA's processor import torchvision, which fails
# next to the local torch 2.13.0+cpu wheel, so this venv takes the torch 2.14.1 + torchvision 0.29.1 pair from
# this machine's disk. apo_ray goes in without its dependencies: scripts/check_openvla.sh runs the model-level path.
OPENVLA_PKGS := torch==2.14.1 torchvision==0.29.1 transformers==4.40.1 tokenizers==0.19.1 timm==0.9.16 \
	peft==0.11.1 "numpy<2" "pyarrow<19" pyyaml safetensors pillow
openvla-env: .venv-openvla/.stamp

.venv-openvla/.stamp: Makefile
	@test -x .venv-openvla/bin/python || python3.11 -m venv .venv-openvla || python3 -m venv .venv-openvla
	.venv-openvla/bin/python -m pip install -q $(OPENVLA_PKGS)
	.venv-openvla/bin/python -m pip install -q --no-deps -e .
	.venv-openvla/bin/python -c "import timm, transformers, tokenizers, torchvision, peft; print(timm.__version__, transformers.__version__, tokenizers.__version__)"
	@touch $@

clean:
	rm -rf runs .pytest_cache
