"""docs/errors.md lists every reason the services raise, so clients can rely on the table."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
PATTERNS = [
    re.compile(r"StatusCode\.[A-Z_]+,\s*\"([A-Z][A-Z_]+)\""),
    re.compile(r"\b(?:invalid|unauthenticated|_out_of_range)\(\s*\"([A-Z][A-Z_]+)\""),
]


def test_every_raised_reason_is_documented() -> None:
    documented = set(re.findall(r"\| `([A-Z_]+)` \|", (ROOT / "docs" / "errors.md").read_text()))
    raised: dict[str, str] = {}
    sources = ("services",), ("bimip", "core"), ("bimip", "sdk")
    for path in [p for parts in sources for p in ROOT.joinpath(*parts).rglob("*.py")]:
        text = path.read_text()
        for pattern in PATTERNS:
            for reason in pattern.findall(text):
                raised.setdefault(reason, str(path.relative_to(ROOT)))
    assert len(raised) > 30  # the patterns still find the reasons
    missing = {reason: where for reason, where in raised.items() if reason not in documented}
    assert not missing, f"reasons raised but not in docs/errors.md: {missing}"
