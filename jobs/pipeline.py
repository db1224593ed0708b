"""`ray job submit --working-dir . -- python jobs/pipeline.py --config FILE [--deploy] [key=value ...]`

The whole pipeline (priors -> encode -> train, or tune with a `tune:` section -> register
[-> Serve]); stages whose inputs are unchanged since their last run are skipped.
"""

import sys

from raydb.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
