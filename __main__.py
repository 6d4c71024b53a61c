"""`python -m unconfused ...`"""

import sys

from .trainers.cli import main

sys.exit(main())
