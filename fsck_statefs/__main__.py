import sys

from fsck_statefs.cli import main

sys.exit(main())
