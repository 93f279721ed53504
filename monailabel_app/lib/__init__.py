"""The MONAI Label adapter of sam_medical: configs, infer tasks, train task, the shared served model."""
