"""The base layer: errors, types, small helpers, CRC32C and synchronization primitives.

Imports nothing else of the package; every other layer may import it.
"""
