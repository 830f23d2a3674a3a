"""`python -m stackelberg` is the `stackelberg` command."""
import sys

from stackelberg.cli import main

if __name__ == "__main__":
    sys.exit(main())
