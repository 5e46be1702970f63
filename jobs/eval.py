"""Entry point for ``ray job submit``: evaluation (pairwise judge, Super-NI ROUGE-L, ranking
agreement) of one model or several.

    ray job submit --working-dir . -- python jobs/eval.py --config jobs/configs/eval-llama-7b.yaml

Inside a Ray job, RAY_ADDRESS is set, so the stages join the cluster instead of starting one.
"""

import sys

from tuna_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
