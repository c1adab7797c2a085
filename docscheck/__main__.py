"""`python -m docscheck settings-table`: rewrite the README's generated settings table."""

from __future__ import annotations

import argparse

from config.settings import settings_table
from docscheck.readme import README, with_generated_block

GENERATORS = {"settings-table": settings_table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("block", choices=sorted(GENERATORS), help="the generated block to rewrite")
    args = parser.parse_args()
    README.write_text(with_generated_block(README.read_text(), args.block, GENERATORS[args.block]()))
    print(f"rewrote the README's {args.block}")


if __name__ == "__main__":
    main()
