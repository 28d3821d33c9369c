"""``python -m blockd``: the same entry point as the ``blockd`` console script."""

from blockd.cli import main

raise SystemExit(main())
