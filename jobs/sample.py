"""Entry point for ``ray job submit``: the student sampling stage.

ray job submit --working-dir . -- python jobs/sample.py --config jobs/configs/<name>.yaml
"""

import sys

from tuna_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
