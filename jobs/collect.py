"""`ray job submit --working-dir . -- python jobs/collect.py ...`.

Deployment/expert rollouts to Parquet, e.g. --task lift --policy oracle --episodes 4 --out DIR; arguments as for `apo-ray collect`.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("collect", sys.argv[1:]))
