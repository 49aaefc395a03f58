#!/usr/bin/env bash
# The GPU path in one short prepared script: bf16, DeepSpeed ZeRO-2 and ZeRO-3 on CUDA through Ray Train, and
# model.kind hf + LoRA (the config switch for OpenVLA-7B). Run it on a machine with NVIDIA GPUs after
# `make setup`; about 10 minutes on one GPU. Every output lands in OUT, the summary in OUT/summary.json.
#   bash scripts/gpu_check.sh [OUT]                 # OUT defaults to runs/gpu_check
#   HF_VLA=/models/openvla-7b IMAGE_SIZE=224 bash scripts/gpu_check.sh   # a real local HF VLA instead of the
#                                                   # exported tiny one (not run: no weights or GPU where it was written)
#   GPU_CHECK_CPU=1 bash scripts/gpu_check.sh       # the same steps on CPU (fp32, gloo): checks the script itself
#   GPU_CHECK_SYNTH=1 PY=python3 bash scripts/gpu_check.sh   # a GPU box without robosuite/EGL: synthesized
#                                                   # episodes instead of simulator rollouts, and no eval
# Steps: GPU-only tests; oracle demos and noisy deployments with corrector takeovers; a tiny BC policy; that policy
# exported as an HF remote-code dir (apo-ray export-hf); BC with LoRA on it; the dataset's reference stage with the
# LoRA checkpoint (on a GPU of its own); APO against the cached reference (ZeRO-2) and against a live replica
# (ZeRO-3) at lr 0, whose losses must agree (1e-5 in fp32, 1e-3 in bf16); a short eval; bench train (full
# fine-tuning and LoRA) on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
export MUJOCO_GL=${MUJOCO_GL:-egl} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl} RAY_USAGE_STATS_ENABLED=0
PY=${PY:-.venv/bin/python}
APO="$PY -m apo_ray"
W=${WORKERS:-4}
IMG=${IMAGE_SIZE:-64}
mkdir -p "$OUT"
step() { echo "== $* ($(date +%T))"; }

if [ -z "${GPU_CHECK_CPU:-}" ]; then
  step "device"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print(torch.cuda.get_device_name(0), 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())"
  step "GPU-only tests"
  $PY -m pytest -q -p no:cacheprovider -m gpu tests/
else
  export DS_ACCELERATOR=cpu
  W=2
fi

if [ -z "${GPU_CHECK_SYNTH:-}" ]; then
  step "oracle demos and corrected noisy deployments (lift)"
  $APO collect --task lift --policy oracle --no-corrector --episodes 16 --workers "$W" --seed 0 --image-size "$IMG" \
    --out "$OUT/demos" --resume
  $APO collect --task lift --scenario position --policy noisy-oracle:0.3 --episodes 8 --workers "$W" --seed 500000 \
    --image-size "$IMG" --out "$OUT/deploy" --resume
else
  step "synthesized episodes in the collect schema (no simulator)"
  $PY -c "import sys; from pathlib import Path; from apo_ray.bench.data import synth_episodes as s
s(Path(sys.argv[1]) / 'demos/episodes', 16, 40, int(sys.argv[2]), seed=0)
s(Path(sys.argv[1]) / 'deploy/episodes', 8, 40, int(sys.argv[2]), seed=1)" "$OUT" "$IMG"
fi

step "tiny BC policy in bf16 (ZeRO-2), exported as an HF remote-code VLA"
$APO dataset --demos "$OUT/demos/episodes" --out "$OUT/ds_demos"
$APO train --data "$OUT/ds_demos" --init scratch --objective bc --workers 1 --zero 2 --epochs 1 --out "$OUT/bc_tiny" \
  train.max_steps=20
HF=${HF_VLA:-$OUT/hf_vla}
if [ -z "${HF_VLA:-}" ]; then
  $APO export-hf --checkpoint "$OUT/bc_tiny/checkpoint" --out "$HF"
fi
LORA=(model.kind=hf "model.path=$HF" model.lora_r=8)
TGT=(train.undesirable_tokens=differ train.corrector_weight=2.0)  # the FINDINGS §12 options, cached and live

step "model.kind hf: BC with LoRA adapters (ZeRO-2)"
$APO train --data "$OUT/ds_demos" --init scratch --objective bc --workers 1 --zero 2 --epochs 1 --out "$OUT/bc_hf" \
  train.max_steps=10 "${LORA[@]}"

step "reference stage with the LoRA checkpoint, then APO: cached reference (ZeRO-2) vs live replica (ZeRO-3)"
$APO dataset --episodes "$OUT/deploy/episodes" --demos "$OUT/demos/episodes" --out "$OUT/ds_ref" \
  --ref-checkpoint "$OUT/bc_hf/checkpoint"
$APO train --data "$OUT/ds_ref" --init "$OUT/bc_hf/checkpoint" --objective apo --workers 1 --zero 2 --epochs 1 \
  --out "$OUT/apo_cached" train.max_steps=4 train.lr=0 "${LORA[@]}" "${TGT[@]}" | tail -n 1 > "$OUT/apo_cached.json"
$APO train --data "$OUT/ds_ref" --init "$OUT/bc_hf/checkpoint" --objective apo --workers 1 --zero 3 --epochs 1 \
  --out "$OUT/apo_live" train.max_steps=4 train.lr=0 train.reference=live "${LORA[@]}" "${TGT[@]}" | tail -n 1 > "$OUT/apo_live.json"
$APO train --data "$OUT/ds_ref" --init "$OUT/bc_hf/checkpoint" --objective apo --workers 1 --zero 2 --epochs 1 \
  --out "$OUT/apo" train.max_steps=20 "${LORA[@]}" "${TGT[@]}" | tail -n 1 > "$OUT/apo.json"

if [ -z "${GPU_CHECK_SYNTH:-}" ]; then
  step "eval of the APO LoRA checkpoint"
  $APO eval --policy "$OUT/apo/checkpoint" --task lift --scenario nominal --episodes 4 --workers "$W" --seed 100000 \
    --image-size "$IMG" --out "$OUT/eval" | tail -n 1 > "$OUT/eval.json"
else
  echo '{"success_rate": null}' > "$OUT/eval.json"
fi

step "bench train on the device: full fine-tuning and LoRA"
$APO bench train --hidden 512 --layers 8 --steps 20 | tail -n 1 > "$OUT/bench_full.json"
$APO bench train --hidden 1024 --layers 16 --steps 10 --lora-r 16 | tail -n 1 > "$OUT/bench_lora.json"

$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rd = {k: json.loads((out / f"{k}.json").read_text()) for k in ("apo_cached", "apo_live", "apo", "eval", "bench_full", "bench_lora")}
gap = abs(rd["apo_cached"]["loss"] - rd["apo_live"]["loss"])
summary = {
    "cached_vs_live_loss_gap": gap,
    "apo_loss": rd["apo"]["loss"], "apo_samples_per_s": rd["apo"].get("samples_per_s_mean"),
    "eval_success_rate": rd["eval"]["success_rate"],
    "bench_full": {k: rd["bench_full"].get(k) for k in ("cached_vs_live_speed", "cached_vs_live_memory", "ours_vs_paper_speed")},
    "bench_lora": {k: rd["bench_lora"].get(k) for k in ("cached_vs_live_speed", "cached_vs_live_memory", "ours_vs_paper_speed")},
    "device": rd["bench_full"]["cached"]["device"],
}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
# fp32 (CPU): the 1e-5 of the tests; bf16 (CUDA) keeps 8 mantissa bits, so both sides round differently
tol = 1e-5 if summary["device"] == "cpu" else 1e-3
assert gap < tol, f"cached and live reference losses differ by {gap} (tolerance {tol})"
EOF
