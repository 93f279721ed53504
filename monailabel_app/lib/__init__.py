"""The MONAI Label adapter of sam_medical: settings, infer tasks, train task, the shared served model."""
