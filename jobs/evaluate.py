"""`ray job submit --working-dir . -- python jobs/evaluate.py ...`.

Held-out evaluation, e.g. --policy CKPT --task lift --scenario position --out DIR; arguments as for `apo-ray eval`.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("eval", sys.argv[1:]))
