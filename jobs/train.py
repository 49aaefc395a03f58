"""`ray job submit --working-dir . -- python jobs/train.py ...`.

One training run, e.g. --config configs/smoke.yaml --data DIR --init scratch --out DIR; arguments as for `apo-ray train`.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("train", sys.argv[1:]))
