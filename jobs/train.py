"""`ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/demo.yaml [key=value ...]`"""

import sys

from raydb.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
