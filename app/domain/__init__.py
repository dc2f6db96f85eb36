"""Domain types and rules: labels, records, the prompt, the CMCC-34 taxonomy. Pure Python: no torch, no SQLAlchemy."""
