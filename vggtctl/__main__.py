"""`python -m vggtctl` runs the console."""

from vggtctl.cli.app import main

if __name__ == "__main__":
    main()
