"""Storage formats of the tables: each table owns its codec, and one agent writes it."""
