"""Everything distributed and everything that trains."""
