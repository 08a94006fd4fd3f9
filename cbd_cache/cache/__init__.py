"""The teacher-descriptor cache: schema, codec, store, writer, reader, integrity, info (see cache/schema.py)."""
