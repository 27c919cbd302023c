"""Entry point for ``python -m noisequery_core``."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
