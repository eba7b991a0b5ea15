"""``python -m cem_fast`` (and ``torchrun ... -m cem_fast run CONFIG.yml --out DIR``): the ``cem-fast`` CLI."""
import sys

from .cli import main

sys.exit(main())
