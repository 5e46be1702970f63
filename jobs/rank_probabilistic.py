"""Entry point for ``ray job submit``: the probabilistic ranking stage.

ray job submit --working-dir . -- python jobs/rank_probabilistic.py --config jobs/configs/<name>.yaml
"""

import sys

from tuna_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["rank-probabilistic", *sys.argv[1:]]))
