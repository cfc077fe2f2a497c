"""CLI subcommands. Each module: ``HELP``, ``add_arguments(parser)``, ``run(args) -> int``.

Only the standard library is imported at module level here; heavy imports go inside ``run``.
"""
