"""deqlit: DEQ-DDIM — a diffusion model's whole DDIM chain solved as one fixed point."""
from deqlit.deq.layer import DEQSampler
from deqlit.deq.solvers import SOLVERS, SolverDivergedError, solve
from deqlit.models.loading import load_weights
from deqlit.models.unet import DDIMUNet

__all__ = ["DDIMUNet", "DEQSampler", "SOLVERS", "SolverDivergedError", "load_weights", "solve"]
__version__ = "0.1.0"
