"""Restore drills: proving that the newest verified backup of a target actually restores,
without touching anything live."""
