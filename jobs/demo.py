"""Job entrypoint for the offline demo (the whole pipeline on bundled data, SmolLM2-135M-Instruct).

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        -- python jobs/demo.py --set run_dir=/shared/runs/demo

Arguments are those of `craft-ray demo`.
"""

import sys

from craft_ray.cli import app

if __name__ == "__main__":
    app(["demo", *sys.argv[1:]])
