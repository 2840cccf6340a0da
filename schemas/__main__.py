import sys

from schemas.imzarr_cli import main

sys.exit(main())
