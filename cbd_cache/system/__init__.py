"""Small system helpers, one job each: storage, digests, logs, seeding, locks, malloc, torchrun, runtime, jobs, tables."""
