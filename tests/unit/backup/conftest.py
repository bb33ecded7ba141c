"""Hypothesis keeps its example database and caches out of the work tree (no `.hypothesis/`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "nest-hypothesis")
settings.register_profile("nest-backup", database=None)
settings.load_profile("nest-backup")
