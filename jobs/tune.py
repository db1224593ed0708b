"""`ray job submit --working-dir . -- python jobs/tune.py --config my-tune.yaml [key=value ...]`

The search and its registration (the tune stage runs priors and the encode stage itself; the
pipeline's register stage registers the best trial); the config needs a `tune:` section.
"""

import sys

from raydb.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", "--stages", "tune,register", *sys.argv[1:]]))
