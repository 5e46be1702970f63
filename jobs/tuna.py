"""Entry point for ``ray job submit``: the whole Tuna pipeline.

    ray job submit --address http://HEAD:8265 --working-dir . \
        -- python jobs/tuna.py --config jobs/configs/llama-7b-8gpu.yaml [key=value ...]
"""

import sys

from tuna_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
