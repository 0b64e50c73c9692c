import os
import sys

# Tests run from a checkout; make the packages importable without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
