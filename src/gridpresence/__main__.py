"""The ``gridpresence`` command (also ``python -m gridpresence``).

Importing the CLI (slixmpp, OpenPGP, pydantic) takes a second or more; a Ctrl-C during it ends
the command quietly instead of with a KeyboardInterrupt traceback. From then on the commands
handle Ctrl-C themselves (``gridpresence.host.signals``).
"""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


def main() -> int:
    try:
        from gridpresence.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
