"""Named paper experiments (see ``laperm run --help``)."""
