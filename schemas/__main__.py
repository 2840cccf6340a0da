from schemas.imzarr_cli import main
from schemas.cli_support import exit_process

if __name__ == "__main__":  # spawned worker processes import this module too
    exit_process(main())
