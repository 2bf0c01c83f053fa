"""Detection, verification and impact analysis of super weights."""
