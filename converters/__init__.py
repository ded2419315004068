"""Dataset packers: one module per source dataset, one writer per packed format."""
