"""`ray job submit --working-dir . -- python jobs/lifelong.py ...`.

The lifelong loop, e.g. --config configs/smoke.yaml --run-dir s3://bucket/runs/smoke; arguments as for `apo-ray loop`.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("loop", sys.argv[1:]))
