import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

from hypothesis import settings  # noqa: E402

# Shared CPU machines make per-example timings noisy: hypothesis checks properties, not speed.
settings.register_profile("ddpm", deadline=None, max_examples=100)
settings.load_profile("ddpm")
