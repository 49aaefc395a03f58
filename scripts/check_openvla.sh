#!/usr/bin/env bash
# Our model.kind hf path against OpenVLA's own code: builds a tiny random-init OpenVLA from OPENVLA_SRC's
# prismatic/extern/hf/{configuration,modeling,processing}_prismatic.py (tiny timm ViTs, a 2-layer Llama), in the
# second venv OpenVLA's pins demand (make openvla-env: transformers 4.40.1, tokenizers 0.19.1, timm 0.9.16), and
# prints one JSON line last: {"ok", "bc_loss", "apo_cached_vs_live_gap", "predict_action_max_abs_diff", "steps", ...}.
# Usage: scripts/check_openvla.sh OPENVLA_SRC [--work DIR] [--steps N]
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1/prismatic/extern/hf/modeling_prismatic.py" ]; then
  echo "error: no prismatic/extern/hf/modeling_prismatic.py under '${1:-}' (OPENVLA_SRC); fix: pass a checkout of github.com/openvla/openvla" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
make --no-print-directory openvla-env >&2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_MODULES_CACHE="${HF_MODULES_CACHE:-$(mktemp -d)}"
exec .venv-openvla/bin/python -m apo_ray.openvla_check "$@"
