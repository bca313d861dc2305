"""``python -m moalign ARGS`` = ``moalign ARGS``; also the module launchers take: ``torchrun -m moalign train ...``,
``accelerate launch -m moalign train ...``."""

import sys

from moalign.cli import main

if __name__ == "__main__":
    sys.exit(main())
