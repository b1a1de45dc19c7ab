"""``python -m sockpolicy``: the same command line as the ``sockpolicy`` script."""

from sockpolicy._cli import main

if __name__ == "__main__":
    main()
