"""The unit layer: no emulator, no network. Runs on every supported Python (3.10-3.13).

Shared fixtures (`tmpfs`, `remount`) are in tests/conftest.py."""
