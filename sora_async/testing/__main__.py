"""Run the fake APIXO service standalone: ``python -m sora_async.testing --port 8765``."""

from ._serve import main

if __name__ == "__main__":
    raise SystemExit(main())
