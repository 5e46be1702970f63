import sys

from tuna_ray.cli import main

sys.exit(main())
