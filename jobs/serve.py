"""`ray job submit --working-dir . -- python jobs/serve.py --config jobs/configs/demo.yaml [key=value ...]`

Deploys or updates the Serve app on the cluster running the job and returns (the app outlives the
job). Run directly, it starts a local cluster and serves until Ctrl-C.
"""

import sys

from raydb.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", "--stages", "serve", *sys.argv[1:]]))
