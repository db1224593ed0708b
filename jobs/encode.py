"""`ray job submit --working-dir . -- python jobs/encode.py --config jobs/configs/demo.yaml [k=v ...]`"""

import sys

from raydb.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
