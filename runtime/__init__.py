"""runtime: the `rafs` command line and, later, `rafs run`."""
