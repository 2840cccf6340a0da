from schemas.cli.dispatch import run

if __name__ == "__main__":  # `python -m schemas` is the `imzarr` command
    run()
