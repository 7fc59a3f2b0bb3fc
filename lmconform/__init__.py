"""The ``lmconform`` command: it only composes the subcommands each package owns."""
