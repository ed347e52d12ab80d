"""Config keys that moved or went away: old dotted path -> new dotted path, or why it was removed."""

RENAMED: dict[str, str] = {
    "seed": "removed: it was never read; each section has its own seed",
}
