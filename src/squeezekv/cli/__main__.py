"""``python -m squeezekv.cli``: how ``bench --tp`` relaunches itself under torchrun."""

import sys

from squeezekv.cli import main

sys.exit(main())
