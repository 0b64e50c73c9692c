"""``python -m keystored``: same as the ``keystored`` console script."""

from keystored.server import main

raise SystemExit(main())
