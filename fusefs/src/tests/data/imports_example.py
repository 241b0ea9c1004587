"""The source of imports_example.cpython-311.pyc, the compiled module the pyc reader's
tests read (python3.11 -c 'import py_compile; py_compile.compile("imports_example.py",
"imports_example.cpython-311.pyc", invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)').
Its top-level imports are what the reader must find; those in functions are not."""
import os
import os.path as osp
import xml.etree.ElementTree
from collections import OrderedDict, abc
from . import sibling
from .sub.deeper import thing
from .. import uncle
import json as _json, re


def later():
    import never_at_start

    return never_at_start


class Klass:
    def method(self):
        from . import also_later

        return also_later


try:
    import maybe
except ImportError:
    maybe = None

BIG = 10**30
FLOAT = 1.5
COMPLEX = 1j
BYTES = b"bytes"
NESTED = (1, "two", (3, None))
FROZEN = frozenset({"a"})
TABLE = {"k": [1, 2]}
