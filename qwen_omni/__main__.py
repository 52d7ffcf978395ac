import sys

from .cli import main

if __name__ == "__main__":  # not when `serve --engine-process` spawns its model process (which imports this)
    sys.exit(main())
