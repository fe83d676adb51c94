"""`python -m goose`: the same as the `goose` command."""
import sys

from goose.cli import main

sys.exit(main())
