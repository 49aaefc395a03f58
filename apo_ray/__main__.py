import sys

from apo_ray.cli import main

sys.exit(main())
