"""``python -m sora_async``: the command line."""

from .cli import main

main()
