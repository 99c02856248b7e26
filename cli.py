"""`python cli.py COMMAND ...` from a checkout: the same as the installed `nodulekit COMMAND ...`.

No install needed: this file's folder (the checkout) goes first on sys.path, so the
`nodulekit` package beside it is the one imported (its dependencies must be importable:
`pip install -r` of pyproject's dependencies, or a venv). `nodulekit train --gpus N` starts
its ranks with the same package (`nodulekit.distributed.launcher` puts the checkout on their
PYTHONPATH).
"""

import os
import sys

CHECKOUT = os.path.dirname(os.path.abspath(__file__))
if CHECKOUT not in sys.path[:1]:
    sys.path.insert(0, CHECKOUT)

from nodulekit.cli import main  # noqa: E402  (after the path is set)

if __name__ == "__main__":
    main(prog_name="nodulekit")
