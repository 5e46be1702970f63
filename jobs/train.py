"""Entry point for ``ray job submit``: the training stage.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train-demo-cpu.yaml

Inside a Ray job, RAY_ADDRESS is set, so the stage joins the cluster instead of starting one.
"""

import sys

from tuna_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
