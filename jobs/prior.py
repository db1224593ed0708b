"""`ray job submit --working-dir . -- python jobs/prior.py --config jobs/configs/demo.yaml [key=value ...]`"""

import sys

from raydb.cli import main

if __name__ == "__main__":
    sys.exit(main(["prior", *sys.argv[1:]]))
