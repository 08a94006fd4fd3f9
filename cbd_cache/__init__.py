"""cbd-cache: Class-Balanced Distillation (Iscen et al., BMVC 2021) with a cache of teacher descriptors."""
__version__ = "0.1.0"
