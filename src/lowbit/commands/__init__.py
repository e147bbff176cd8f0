"""CLI subcommands: one module per command, each exposing `register(subparsers)`.

`register` adds a subparser whose `func` attribute is `run(args) -> int`.
"""

COMMAND_MODULES = ("demo", "quantize", "doctor", "bench", "generate", "eval")
