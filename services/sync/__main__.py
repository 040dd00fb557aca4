"""`python -m services.sync`: run the sync service alone, as a deployment does."""

from bimip.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", "sync"]))
