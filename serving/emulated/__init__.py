"""Emulated devices: a performance-and-energy model behind the same engine protocol as real engines."""
