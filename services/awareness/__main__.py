"""`python -m services.awareness`: run the awareness service alone, as a deployment does."""

from bimip.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", "awareness"]))
