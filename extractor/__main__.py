from schemas.cli import run_main


def main() -> int | None:
    from extractor.cli import main as command  # imported under run_main: Ctrl-C while importing is one line too

    return command()


if __name__ == "__main__":  # spawned worker processes import this module too
    run_main("python -m extractor", main)
