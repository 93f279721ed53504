"""quickstart."""
