"""projectord's schema and the read models' tables: migrations, drift and repair, row-level
security, online rebuilds."""
