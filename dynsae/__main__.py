import sys

from dynsae.cli import main

sys.exit(main())
