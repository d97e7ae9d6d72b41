"""``python -m dynsae ...``: the ``dynsae`` console script (:mod:`dynsae.cli`)."""

import sys

from dynsae.cli import main

if __name__ == "__main__":
    sys.exit(main())
