"""`python -m rtlocal.cli`: the same as the `rtlocal` command."""

import sys

from rtlocal.cli.app import main

sys.exit(main())
