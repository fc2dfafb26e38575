"""calibrated-rlhf
"""

__version__ = "0.1"
