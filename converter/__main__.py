from converter.cli import main
from schemas.cli import run_main

if __name__ == "__main__":  # spawned worker processes import this module too
    run_main("python -m converter", main)
