"""Data: sources (readers), the long-tail profile, WebDataset shards + manifest, samplers and streams."""
