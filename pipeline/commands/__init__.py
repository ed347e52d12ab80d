"""One module per CLI command: ``add_arguments(parser)`` and ``run(args)``."""

import argparse


def int_at_least(lo: int):
    """An argparse ``type`` for integers >= ``lo`` (argparse turns the error into one usage line)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    return parse
