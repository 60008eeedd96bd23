"""``python -m tierflow``: the same as the ``tierflow`` command."""

import sys

from tierflow.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
