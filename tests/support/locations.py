"""Where the repository and the committed reference fixtures are."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
EDM_REFERENCE = FIXTURES / "edm_small_A.pt"
