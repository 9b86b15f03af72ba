"""``python -m geocomplexity``: the ``geocomplexity`` command (see :mod:`.cli`)."""

from geocomplexity.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
