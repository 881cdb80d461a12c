import os
import sys

# tests/oracle.py is imported by the backend tests as `oracle`
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
