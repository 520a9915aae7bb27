"""Subcommands of ``vtpm-verify``; each module exposes ``register(subparsers)``."""
