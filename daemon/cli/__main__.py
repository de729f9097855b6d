"""`python -m jobwarden.cli`, the same as the `jobwarden` command."""

import sys

from jobwarden.cli import main

sys.exit(main())
