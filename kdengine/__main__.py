"""`python -m kdengine ...` runs the `kdengine` command."""
import sys

from kdengine.cli import main

sys.exit(main())
