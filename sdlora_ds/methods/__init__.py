"""One module per continual-learning method, each declaring `METHOD = registry.Method(...)`.

Every module here is a method: registry.py imports them all on first use (docs/adding_a_method.md).
"""
