"""The source of imports_one.cpython-311.pyc (compiled as imports_example.py says): a
module the fetch tests put where imports_example imports `sibling` from, which imports
one more module."""
import deep_only_via_sibling
