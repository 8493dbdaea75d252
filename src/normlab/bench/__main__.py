"""``python -m normlab.bench``: the same as ``normlab bench``."""

import sys

from normlab.bench import main

if __name__ == "__main__":
    sys.exit(main())
