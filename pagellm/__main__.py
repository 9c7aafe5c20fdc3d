"""``python -m pagellm`` (and ``torchrun ... -m pagellm``): the ``pagellm`` command."""
import sys

from pagellm.cli import main

sys.exit(main())
