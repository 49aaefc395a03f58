#!/usr/bin/env bash
# The lifelong loop itself on one GPU machine, in a few minutes: the GPU-only tests and the GPU placement tests,
# then configs/smoke.yaml (round 0 + 1 round) with the rollout and eval actors on quarter-GPU shares (the policy
# acting in bf16 on CUDA), Ray Train + DeepSpeed on CUDA, the reference stage on the GPU, and MuJoCo rendering
# through EGL. scripts/gpu_check.sh covers the trainer paths (ZeRO-3 live reference, LoRA on an HF VLA) instead.
#   bash scripts/gpu_loop_check.sh [OUT]          # after `make setup`; OUT defaults to runs/gpu_loop
#   PY=python3 bash scripts/gpu_loop_check.sh     # a GPU box with our packages on PYTHONPATH instead of a venv
# OUT/summary.json: per stage its seconds and where it ran (policy_device for rollouts, device for training).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_loop}
PY=${PY:-.venv/bin/python}
export MUJOCO_GL=egl PYOPENGL_PLATFORM=egl RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
mkdir -p "$OUT"
step() { echo "== $* ($(date +%T))"; }
FAILED=()  # a failed check is reported at the end; the later ones still run

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print(torch.cuda.get_device_name(0), 'torch', torch.__version__)"

step "MuJoCo offscreen rendering through EGL"
$PY - <<'EOF' || FAILED+=(render)
import mujoco
from OpenGL import GL
m = mujoco.MjModel.from_xml_string('<mujoco><worldbody><light pos="0 0 1"/><geom size=".1"/></worldbody></mujoco>')
d = mujoco.MjData(m)
mujoco.mj_forward(m, d)
r = mujoco.Renderer(m, 64, 64)
r.update_scene(d)
img = r.render()
print("rendered", img.shape, "mean", round(float(img.mean()), 1), "GL renderer", GL.glGetString(GL.GL_RENDERER).decode())
r.close()
EOF

step "GPU-only and placement tests"
$PY -m pytest -q -p no:cacheprovider -m gpu tests/ || FAILED+=(gpu-tests)
$PY -m pytest -q -p no:cacheprovider tests/test_rollout.py -k "gpu_share or placement or offers" tests/test_cluster.py \
  || FAILED+=(placement-tests)

step "smoke loop: rollouts on GPU shares, training and the reference stage on the GPU"
VIDEOS=()
if ! $PY -c "import imageio_ffmpeg; imageio_ffmpeg.get_ffmpeg_exe()" 2>/dev/null; then
  echo "no ffmpeg for imageio: videos off"
  VIDEOS=(collect.videos=0 eval.videos=0)
fi
rm -rf "$OUT/run"
$PY -m apo_ray loop --config configs/smoke.yaml --run-dir "$OUT/run" --no-progress loop.rounds=1 \
  collect.gpus_per_worker=0.25 eval.gpus_per_worker=0.25 "${VIDEOS[@]}"

step "summary"
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
stages = json.loads((out / "run" / "journal.json").read_text())["stages"]
rows = {}
for key, st in stages.items():
    r = st.get("result") or {}
    where = r.get("policy_device") or r.get("device")
    rows[key] = {"seconds": round(st.get("seconds", 0.0), 1), "where": where,
                 **{k: r[k] for k in ("success_rate", "episodes", "intervention_steps", "loss", "samples_per_s",
                                      "rows", "reference") if k in r}}
(out / "summary.json").write_text(json.dumps(rows, indent=1))
print(json.dumps(rows, indent=1))
EOF
[ ${#FAILED[@]} -eq 0 ] || { echo "failed: ${FAILED[*]}"; exit 1; }
