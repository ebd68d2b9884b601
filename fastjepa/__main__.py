"""``python -m fastjepa COMMAND``: the same as the ``fastjepa`` command."""

import sys

from fastjepa.cli import main

sys.exit(main())
