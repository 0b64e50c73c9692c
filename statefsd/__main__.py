"""`python -m statefsd` runs the daemon (the CLI is `python -m statefsd.cli`)."""

import sys

from statefsd.daemon import main

sys.exit(main())
