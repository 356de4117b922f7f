"""Reading users' models and data files."""
