"""Compatibility shims that let third-party model packages run on the pinned stack."""
