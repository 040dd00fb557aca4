"""`python -m services.messaging`: run the messaging service alone, as a deployment does."""

from bimip.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", "messaging"]))
