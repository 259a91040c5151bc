"""``python -m fleetward``: the ``fleetward`` console script (an agent image's entry point)."""

from fleetward.cli.entry import main

if __name__ == "__main__":
    main()
