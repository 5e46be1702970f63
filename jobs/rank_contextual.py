"""Entry point for ``ray job submit``: the contextual ranking stage.

ray job submit --working-dir . -- python jobs/rank_contextual.py --config jobs/configs/<name>.yaml
"""

import sys

from tuna_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["rank-contextual", *sys.argv[1:]]))
