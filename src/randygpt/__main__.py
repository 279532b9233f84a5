"""`python -m randygpt ...`: see randygpt.cli."""
import sys

from .cli import main

sys.exit(main())
