"""megaent: model-parallel RL for reasoning LMs with entropy control."""
import warnings

__version__ = "0.1.0"

# megatron-core warns at import on every machine without Transformer Engine / apex (all CPU machines) and
# about CUDA_DEVICE_MAX_CONNECTIONS on CPU; megaent's own backend check says what is missing when it matters.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="When using async grad allreduce")
