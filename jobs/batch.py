"""`ray job submit --working-dir . -- python jobs/batch.py --config FILE --manifest subjects.yaml`

Many subjects in one job: one prior fill per class, concurrent trainings, a summary table; a rerun
skips finished subjects (raydb.batch).
"""

import sys

from raydb.cli import main

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
