"""Generation backends behind one interface (interfaces.py)."""
