"""The ``sam-medical`` command line: :mod:`sam_medical.cli.main` and one module per sub-command."""
