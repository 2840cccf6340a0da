from converter.cli import main
from schemas.cli import exit_process

if __name__ == "__main__":  # spawned worker processes import this module too
    exit_process(main())
