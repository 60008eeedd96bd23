"""tierflow's command line: ``tierflow <command> ...``; one module per command.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``, and only calls tierflow's public API.
"""
