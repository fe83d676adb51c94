"""`python -m server`: the same as `goose serve`."""
import sys

from server.serve import main

sys.exit(main())
