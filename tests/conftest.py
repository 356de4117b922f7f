import os
import sys

import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, os.cpu_count() or 1))

settings.register_profile("linadapt", max_examples=15, deadline=None, derandomize=True)
settings.load_profile("linadapt")
