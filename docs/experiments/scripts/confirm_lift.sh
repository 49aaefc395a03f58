#!/bin/bash
# Confirmatory evaluation on fresh seeds 200000.. (never used for collection, tuning or the dev eval list 100000..100049)
cd "$(dirname "$0")/.."
export MUJOCO_GL=egl PYOPENGL_PLATFORM=egl RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 DS_ACCELERATOR=cpu PYTHONPATH=$PWD
P=.venv/bin/python
ev() { # name ckpt scenario episodes
  echo "=== $1 $3 $4 $(date +%T)"
  $P -m apo_ray eval --policy "$2" --task lift --scenario "$3" --episodes "$4" --workers 2 --seed 200000 \
     --out "runs/confirm/$1/$3" --resume | tail -1
  echo "=== done $1 $3 $(date +%T)"
}
ev apo_floor_r3 runs/plw_floor/r3/apo/train/checkpoint position 150
ev dagger_r3 runs/plw_uw5/r3/dagger/train/checkpoint position 150
ev pi0 runs/plw_uw5/r0/base/train/checkpoint position 100
ev apo_floor_r3 runs/plw_floor/r3/apo/train/checkpoint nominal 100
ev dagger_r3 runs/plw_uw5/r3/dagger/train/checkpoint nominal 100
ev pi0 runs/plw_uw5/r0/base/train/checkpoint nominal 100
echo ALL_DONE
