"""Tools around the stages: cache verify, predict, export-model, the dry run, training logs."""
