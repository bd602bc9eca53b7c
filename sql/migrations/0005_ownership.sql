-- Which daemon instance owns each projection (informational: the advisory lock decides).
ALTER TABLE projection_positions ADD COLUMN IF NOT EXISTS owner text;
