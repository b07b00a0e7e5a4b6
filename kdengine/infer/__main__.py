"""``python -m kdengine.infer MODEL INPUT [--batch N] [--json]`` (same as ``kdengine infer``)."""
import sys

from kdengine.infer.runtime import infer_main

sys.exit(infer_main())
