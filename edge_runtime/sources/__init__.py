"""Frame sources. One module per kind; the daemon selects them by the `kind` string in its config."""
