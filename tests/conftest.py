"""pytest configuration shared by every test.

Fixtures live in ``fix_*.py`` modules, loaded here as plugins so that each
test module sees them without importing them.
"""

pytest_plugins = ["tests.fix_pg", "tests.fix_services"]
