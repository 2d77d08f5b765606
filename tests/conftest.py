"""Shared fixtures. Torch-side fixtures live in tests/export/conftest.py so runtime tests stay torch-free."""
