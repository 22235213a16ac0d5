"""One module per command-line command: `register(subparsers)` adds it."""
