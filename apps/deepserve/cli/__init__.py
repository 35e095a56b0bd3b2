"""The `deepserve` command and its subcommands."""
