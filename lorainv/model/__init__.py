"""The reference state-machine model: pure Python, no torch."""
