"""Process groups (TP/PP/DP over megatron-core) and the launch environment."""
from megaent.parallel.launch import LaunchEnv, read_launch_env
from megaent.parallel.state import ParallelError, ParallelState, destroy_parallel, init_parallel, singleton_state

__all__ = ["LaunchEnv", "ParallelError", "ParallelState", "destroy_parallel", "init_parallel", "read_launch_env",
           "singleton_state"]
