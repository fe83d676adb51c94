"""The `goose` command (goose/cli.py) and its non-HTTP subcommands; the server, engine and kernels live beside it."""
