"""Console entry point `kryptvault`."""

from kryptvault.cli.app import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
