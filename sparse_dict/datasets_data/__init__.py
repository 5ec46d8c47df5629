"""Data files shipped with sparse_dict (the bundled text corpus and its licence)."""
