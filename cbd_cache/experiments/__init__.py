"""Uses of the library, above it: sweeps over student settings and the paper's tables. Nothing in the core imports these."""
