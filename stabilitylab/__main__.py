"""`python -m stabilitylab ...` (what torchrun launches) is the `stabilitylab` CLI."""

from stabilitylab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
