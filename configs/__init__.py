"""Built-in configurations (YAML), shipped as package data."""
