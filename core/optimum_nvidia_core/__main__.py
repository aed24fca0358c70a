"""``python -m optimum_nvidia_core ...`` is the ``optimum-nvidia`` command."""
import sys

from .cli import main

sys.exit(main())
