"""The spp-detect commands, one module per group; ``cli.py`` registers each module's
``COMMANDS`` on the group. Shared options and error helpers: :mod:`.options`."""
