import sys
from pathlib import Path

# Tests import shared constants from each other (e.g. test_model.EXACT_PARAMS).
sys.path.insert(0, str(Path(__file__).parent))
