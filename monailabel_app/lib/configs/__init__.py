"""App configuration parsed from ``--conf key value`` pairs."""
