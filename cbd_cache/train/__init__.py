"""Training: the engine, resume, step functions, the one train-one-model skeleton, evaluation, run folders."""
