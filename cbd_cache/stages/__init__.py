"""The pipeline's stages: teachers, import-teacher, export, student (cached, online, cRT), evaluate, NCM."""
