from schemas.cli_support import exit_process
from schemas.imzarr_cli import main

if __name__ == "__main__":  # spawned worker processes import this module too
    exit_process(main())
